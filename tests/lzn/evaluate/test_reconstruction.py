"""lzn.evaluate.reconstruction: the reference's protocol (a seeded subset, independent latent
draws, the L2 norm per image), the same for any units and workers, and its Euler-10 twin."""
from pathlib import Path

import pytest
import torch

from lzn import evaluate as ev
from lzn.data.reader import ImageSplit, load_training_split
from lzn.errors import UserError
from lzn.eval_data import InMemoryData, ShardData
from tests.lzn.evaluate.tasks import gen_cfg, model_of


def seeded_rows(total: int, n: int) -> torch.Tensor:
    """The oracle: the reference's StatefulSampler(seed=0) order on one process."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]


def test_reconstruction_is_the_references_protocol(digits, tmp_path):
    # The reference (lzn/metric/reconstructions_with_computed_ini_noise.py): training images
    # of a seeded shuffle, `draws` independent latent noises each, per image the L2 norm over
    # all pixels, averaged over the images and the draws.
    cfg = gen_cfg(digits, reconstruction_samples=12, reconstruction_draws=3, chunk_size=8)
    data, model = ShardData(digits, image_size=8, channels=1), model_of(cfg)
    units = ev.plan(ev.Job(cfg, data), ["reconstruction"])
    assert [(u.lo, u.hi) for u in units] == [(0, 8), (8, 12), (12, 20), (20, 24), (24, 32), (32, 36)]
    rows = seeded_rows(data.size("train"), 12)
    assert torch.equal(ev.reconstruction_rows(cfg, data), rows)
    out = ev.evaluate_here(cfg, model, data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "p",
                           chosen=["reconstruction"], progress=False)
    images, _ = data.rows_at("train", rows)
    per_draw = []
    for draw in range(3):
        recon = model.reconstruct(images, batch_size=8, method="euler", steps=2, seed=draw)
        per_draw.append(float(torch.linalg.vector_norm((recon.double() - images.double()).flatten(1), dim=1).mean()))
    assert len(set(per_draw)) == 3  # each draw is another latent, so another reconstruction
    assert out["eval/reconstruction_l2"] == pytest.approx(sum(per_draw) / 3, rel=1e-9)
    assert "eval/reconstruction_l2_euler10" not in out  # eval.fid_euler10 is off
    assert ev.reconstruction_samples(gen_cfg(digits, reconstruction_samples=0), data) == data.size("train")
    with pytest.raises(UserError, match=r"reconstruction_draws in \[1, 1000\], got 12 and 0"):
        ev.plan(ev.Job(gen_cfg(digits, reconstruction_samples=12, reconstruction_draws=0), data), ["reconstruction"])


def test_rows_by_index_are_those_of_the_ranges_in_the_given_order(digits):
    shards = ShardData(digits, image_size=8, channels=1)
    memory = InMemoryData(load_training_split(digits, image_size=8, channels=1))
    indices = torch.tensor([1200, 3, 3, 640, 0, 1256, 17])  # unsorted, repeated, across row groups
    expected = [shards.rows("train", i, i + 1) for i in indices.tolist()]
    for data in (shards, memory):
        images, labels = data.rows_at("train", indices)
        assert torch.equal(images, torch.cat([x for x, _ in expected]))
        assert torch.equal(labels, torch.cat([y for _, y in expected]))
    assert shards.rows_at("train", torch.zeros(0, dtype=torch.long))[0].shape == (0, 1, 8, 8)
    with pytest.raises(IndexError, match="index 1257 out of range"):
        shards.rows_at("train", torch.tensor([5, 1257]))


def sorted_by_label(digits: Path) -> InMemoryData:
    """The digits training split in class order, as an image folder's shards keep it."""
    split = load_training_split(digits, image_size=8, channels=1)
    order = torch.argsort(split.train_labels, stable=True)
    return InMemoryData(ImageSplit(split.train_images[order], split.train_labels[order],
                                      split.test_images, split.test_labels))


def test_reconstruction_subset_is_spread_over_a_class_sorted_split(digits):
    data = sorted_by_label(digits)
    cfg = gen_cfg(digits, reconstruction_samples=16)
    assert data.rows("train", 0, 16)[1].unique().tolist() == [0]  # the first rows: one class
    rows = ev.reconstruction_rows(cfg, data)
    assert torch.equal(rows, seeded_rows(1257, 16))
    _, labels = data.rows_at("train", rows)
    assert len(labels.unique()) >= 6, labels.tolist()  # 16 draws of 10 near-equal classes


def test_reconstruction_is_the_same_for_any_units_and_workers(digits, tmp_path):
    data = sorted_by_label(digits)
    cfg = gen_cfg(digits, reconstruction_samples=20, reconstruction_draws=2, fid_euler10=True)
    model = model_of(cfg)
    one = ev.evaluate_here(cfg, model, data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "one",
                           chosen=["reconstruction"], progress=False)
    assert len(ev.plan(ev.Job(cfg, data), ["reconstruction"])) == 4  # 2 draws x 2 solvers
    for chunk in (8, 16):
        chunked = gen_cfg(digits, reconstruction_samples=20, reconstruction_draws=2, fid_euler10=True,
                          chunk_size=chunk)
        # Two workers, each with its own Evaluator, take alternate units in reverse order.
        workers = [ev.Evaluator(chunked, model, data, cache_dir=tmp_path / "cache") for _ in range(2)]
        store = ev.PartStore(tmp_path / f"chunk{chunk}")

        def execute(units):
            for i, unit in reversed(list(enumerate(units))):
                store.save(unit, workers[i % 2].run(unit))

        many = ev.evaluate(chunked, chosen=["reconstruction"], data=data, store=store, execute=execute,
                           extractor=lambda: None)
        assert len(ev.plan(ev.Job(chunked, data), ["reconstruction"])) == 4 * (20 // chunk + 1)
        for key in ("eval/reconstruction_l2", "eval/reconstruction_l2_euler10"):
            assert many[key] == pytest.approx(one[key], rel=1e-12), (chunk, key)


def test_reconstruction_euler10_is_euler_in_10_steps_on_the_same_draws(digits, tmp_path):
    data = sorted_by_label(digits)
    cfg = gen_cfg(digits, reconstruction_samples=12, reconstruction_draws=2, chunk_size=8, fid_euler10=True)
    model = model_of(cfg)
    out = ev.evaluate_here(cfg, model, data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "p",
                           chosen=["reconstruction"], progress=False)
    images, _ = data.rows_at("train", seeded_rows(1257, 12))

    def l2(method, steps):
        per_draw = []
        for draw in range(2):
            recon = model.reconstruct(images, batch_size=8, method=method, steps=steps, seed=draw)
            per_draw.append(torch.linalg.vector_norm((recon.double() - images.double()).flatten(1), dim=1).mean())
        return float(sum(per_draw) / 2)

    assert out["eval/reconstruction_l2"] == pytest.approx(l2("euler", 2), rel=1e-9)  # the task's sampler
    assert out["eval/reconstruction_l2_euler10"] == pytest.approx(l2("euler", 10), rel=1e-9)
    assert out["eval/reconstruction_l2_euler10"] != pytest.approx(out["eval/reconstruction_l2"], rel=1e-6)
    assert ev.metric_for_key(cfg, "eval/reconstruction_l2_euler10") == "reconstruction"
    with pytest.raises(UserError, match=r"eval/reconstruction_l2_euler10.*needs eval.fid_euler10=true"):
        ev.metric_for_key(gen_cfg(digits), "eval/reconstruction_l2_euler10")
