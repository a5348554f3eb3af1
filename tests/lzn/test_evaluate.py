"""lzn.evaluate: sharded evaluation gives the numbers of the unsharded one, parts resume,
the FID reference statistics are cached by manifest and extractor."""
import json
import re
from pathlib import Path

import pytest
import torch

from lzn import evaluate as ev
from lzn.eval_data import InMemoryData, ShardData
from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ImageSplit, load_training_split
from lzn.data.shards import MANIFEST
from lzn.reference_cache import manifest_checksum
from lzn.inference import LZNModel
from lzn.metrics import FeatureMoments, feature_moments, feature_stats
from lzn.objectives import AlignConfig, LatentConfig
from lzn.task import DataConfig, EvalConfig, ModelConfig as TaskModel, TaskConfig, build_objective


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset("digits", None, folder, PrepareConfig(executor="serial"), progress=False)
    return folder


def joint_cfg(digits: Path, **eval_overrides) -> TaskConfig:
    return TaskConfig(
        name="joint_digits", objective="joint",
        data=DataConfig(name="digits", shards_dir=str(digits.parent)),
        model=TaskModel(encoder="digits_cnn", decoder="unet_digits"),
        latent=LatentConfig(dim=16, steps=3), align=AlignConfig(steps=3, log=False),
        eval=EvalConfig(**{"batch_size": 8, "sampler_steps": 2, "fid_samples": 40, "per_class": 3, "alpha": 0.0,
                           **eval_overrides}))


def model_of(cfg) -> LZNModel:
    torch.manual_seed(0)
    return LZNModel(build_objective(cfg), (1, 8, 8))


class Recorder:
    """An executor that runs units here and remembers which it was given."""

    def __init__(self, evaluator, store):
        self.evaluator, self.store, self.calls = evaluator, store, []

    def __call__(self, units):
        self.calls.append([u.name for u in units])
        for u in units:
            self.store.save(u, self.evaluator.run(u))


def run(cfg, data, parts: Path, model=None):
    model = model or model_of(cfg)
    evaluator = ev.Evaluator(cfg, model, data, cache_dir=parts.parent / "cache")
    store = ev.PartStore(parts)
    execute = Recorder(evaluator, store)
    out = ev.evaluate(cfg, chosen=ev.select_metrics(cfg, None), data=data, store=store, execute=execute,
                      extractor=lambda: evaluator.extractor)
    return out, execute.calls


class Features64(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 5, dtype=torch.float64) + 3.0)

    def forward(self, x):
        return x.flatten(1).double() @ self.weight


def test_moments_of_parts_merge_into_the_statistics_of_the_whole():
    torch.manual_seed(0)
    images = torch.rand(53, 1, 4, 4) * 2 - 1
    extractor = Features64()  # float64 features: what is compared is the merge, not float32 GEMMs
    whole = feature_stats(images, extractor, batch_size=7)
    parts = [feature_moments(images[lo:hi], extractor, batch_size=7) for lo, hi in ((0, 1), (1, 20), (20, 53))]
    merged = FeatureMoments.merge_all(parts).stats()
    assert merged.num_samples == 53
    torch.testing.assert_close(merged.mean, whole.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.cov, whole.cov, rtol=0, atol=1e-12)


def test_a_shard_of_generation_is_the_same_slice_of_the_whole(digits):
    cfg = joint_cfg(digits)
    model = model_of(cfg)
    labels = torch.arange(24) % 10
    whole = model.generate(24, labels, steps=2, batch_size=8, seed=3)
    part = model.generate(8, labels[16:], steps=2, batch_size=8, seed=3, first_batch=2)
    torch.testing.assert_close(part, whole[16:], rtol=0, atol=0)
    images = torch.rand(24, 1, 8, 8) * 2 - 1
    full = model.classify(images, batch_size=8)
    assert torch.equal(model.classify(images[8:], batch_size=8, first_batch=1), full[8:])


def test_many_shards_give_the_metrics_of_one(digits, tmp_path):
    data = ShardData(digits, image_size=8, channels=1)
    one, _ = run(joint_cfg(digits), data, tmp_path / "one")
    for cached in (digits / "fid_stats").glob("*.pt"):  # the reference, too, is computed in shards now
        cached.unlink()
    many, calls = run(joint_cfg(digits, chunk_size=16), data, tmp_path / "many")
    assert sum(name.startswith("reference") for name in calls[0]) == 79  # 1257 rows in shards of 16
    assert set(one) == set(many) >= {"eval/fid", "eval/classification_accuracy", "eval/conditional_accuracy"}
    for key, value in one.items():
        if isinstance(value, float):
            # FID of 40 samples in 64 dimensions: a rank-deficient covariance, whose near-zero
            # eigenvalues of S_r S_f put ~1e-9 relative round-off on it when the moments merge
            # in another order (79 parts or 1). The other metrics are exact sums or counts.
            rel = 1e-8 if key.startswith("eval/fid") else 1e-9
            assert many[key] == pytest.approx(value, rel=rel, abs=1e-12), key
        else:
            assert many[key] == value


def test_an_interrupted_evaluation_resumes_from_its_parts(digits, tmp_path):
    cfg, data = joint_cfg(digits, chunk_size=16), ShardData(digits, image_size=8, channels=1)
    first, calls = run(cfg, data, tmp_path / "parts")
    done = sorted((tmp_path / "parts").glob("*.pt"))
    lost = [p for p in done if p.name.startswith(("samples", "classify"))][:2]
    for p in lost:
        p.unlink()
    again, calls = run(cfg, data, tmp_path / "parts")
    assert calls == [sorted(p.stem for p in lost)]  # only what was lost is recomputed
    assert again == first


def test_reference_statistics_are_cached_and_follow_the_manifest(digits, tmp_path):
    cfg, data = joint_cfg(digits, chunk_size=512), ShardData(digits, image_size=8, channels=1)
    stats = digits / "fid_stats"
    for p in stats.glob("*"):
        p.unlink()
    first, calls = run(cfg, data, tmp_path / "a")
    assert [n for n in calls[0] if n.startswith("reference")] == ["reference-00000", "reference-00001",
                                                                  "reference-00002"]
    cached = sorted(stats.glob("digits_cnn-*-8x8x1-*.pt"))
    assert len(cached) == 1
    again, calls = run(cfg, data, tmp_path / "b")  # a new evaluation: the reference comes from the cache
    assert not [n for n in calls[0] if n.startswith("reference")]
    assert again["eval/fid"] == first["eval/fid"]
    # The dataset is prepared differently (here: a shard's checksum changes): a new key.
    # A file of the format before the KID/PR subset joined the name is stale too.
    old_format = stats / re.sub(r"-pr\d+-", "-", cached[0].name)
    old_format.write_bytes(cached[0].read_bytes())
    manifest = json.loads((digits / MANIFEST).read_text())
    before = manifest_checksum(digits)
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (digits / MANIFEST).write_text(json.dumps(manifest))
    try:
        assert manifest_checksum(digits) != before
        _, calls = run(cfg, data, tmp_path / "c")
        assert [n for n in calls[0] if n.startswith("reference")]  # recomputed for the new manifest
        now = sorted(stats.glob("digits_cnn-*-8x8x1-*.pt"))
        assert len(now) == 1 and now != cached and not old_format.exists()  # the stale statistics are gone
    finally:
        prepare_dataset("digits", None, digits, PrepareConfig(executor="serial"), progress=False)


def test_the_same_data_prepared_again_keeps_its_checksum(digits):
    manifest = json.loads((digits / MANIFEST).read_text())
    before = manifest_checksum(digits)
    manifest["created"] = "1999-01-01T00:00:00+0000"
    (digits / MANIFEST).write_text(json.dumps(manifest))
    assert manifest_checksum(digits) == before


def test_metrics_are_checked_against_the_objective(digits):
    cfg = joint_cfg(digits)
    assert ev.select_metrics(cfg, None) == ["fid", "classification", "conditional"]
    with pytest.raises(ValueError, match=r"linear_probe.*do not apply to objective 'joint'.*classification"):
        ev.select_metrics(cfg, ["linear_probe"])
    with pytest.raises(ValueError, match=r"\['fdi'\] are not known"):
        ev.select_metrics(cfg, ["fdi"])


def test_a_checkpoint_of_another_model_is_refused_by_name(digits, tmp_path):
    cfg = joint_cfg(digits)
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {"nothing": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match="does not fit task 'joint_digits'"):
        ev.load_model(cfg, path, "cpu")


def gen_cfg(digits: Path, **eval_overrides) -> TaskConfig:
    return TaskConfig(
        name="gen_digits", objective="generation",
        data=DataConfig(name="digits", shards_dir=str(digits.parent)),
        model=TaskModel(encoder="digits_cnn", decoder="unet_digits"),
        latent=LatentConfig(dim=16, steps=3),
        eval=EvalConfig(**{"batch_size": 8, "sampler_steps": 2, "fid_samples": 40, **eval_overrides}))


def test_fid_labels_are_balanced_exactly_per_class(digits):
    cfg = joint_cfg(digits)
    labels = ev.fid_labels(cfg, 43)
    # 43 = 4 * 10 + 3: every class 4 times, the first 3 classes once more.
    assert torch.bincount(labels, minlength=10).tolist() == [5, 5, 5, 4, 4, 4, 4, 4, 4, 4]
    assert torch.equal(ev.fid_labels(cfg, 43)[:40], ev.fid_labels(cfg, 40))  # a prefix of a larger set
    assert ev.fid_labels(gen_cfg(digits), 43) is None  # unconditional models take no labels
    model = model_of(cfg)
    # The generate() default for a joint model is the same rule (checked through its output).
    torch.testing.assert_close(model.generate(12, steps=2, batch_size=8, seed=1),
                               model.generate(12, ev.fid_labels(cfg, 12), steps=2, batch_size=8, seed=1))


def test_image_set_metrics_and_the_euler10_set_are_reported(digits, tmp_path):
    data = ShardData(digits, image_size=8, channels=1)
    cfg = joint_cfg(digits, fid_euler10=True, kid_pr_samples=30, is_splits=4)
    model = model_of(cfg)
    out = ev.evaluate_here(cfg, model, data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "a",
                           chosen=["fid"], progress=False)
    for key in ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall"):
        assert key and f"eval/{key}" in out and f"eval/{key}_euler10" in out, key
    assert out["eval/kid_subset_size"] == 30 and 1 <= out["eval/is"] <= 10  # 10 digit classes
    assert 0 <= out["eval/precision"] <= 1 and 0 <= out["eval/recall"] <= 1
    # The Euler-10 set is the FID set sampled with Euler in 10 steps (same seeds and labels).
    euler = ev.evaluate_here(joint_cfg(digits, sampler="euler", sampler_steps=10, kid_pr_samples=30, is_splits=4),
                             model, data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "b", chosen=["fid"],
                             progress=False)
    for key in ("fid", "is", "kid", "precision", "recall"):
        assert out[f"eval/{key}_euler10"] == pytest.approx(euler[f"eval/{key}"], rel=1e-9), key
    assert ev.metric_for_key(cfg, "eval/kid_euler10") == "fid"
    with pytest.raises(ValueError, match=r"eval/fid_euler10.*needs eval.fid_euler10=true"):
        ev.metric_for_key(joint_cfg(digits), "eval/fid_euler10")
    with pytest.raises(ValueError, match=r"eval/recall.*needs eval.kid_pr_samples > 0, got 0"):
        ev.metric_for_key(joint_cfg(digits, kid_pr_samples=0), "eval/recall")
    off = ev.evaluate_here(joint_cfg(digits, kid_pr_samples=0, is_splits=4), model, data,
                           cache_dir=tmp_path / "cache", parts_dir=tmp_path / "c", chosen=["fid"], progress=False)
    assert "eval/kid" not in off and off["eval/fid"] == pytest.approx(out["eval/fid"], rel=1e-9)


def seeded_rows(total: int, n: int) -> torch.Tensor:
    """The oracle: the reference's StatefulSampler(seed=0) order on one process."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]


def test_reconstruction_is_the_references_protocol(digits, tmp_path):
    # The reference (lzn/metric/reconstructions_with_computed_ini_noise.py): training images
    # of a seeded shuffle, `draws` independent latent noises each, per image the L2 norm over
    # all pixels, averaged over the images and the draws.
    cfg = gen_cfg(digits, reconstruction_samples=12, reconstruction_draws=3, chunk_size=8)
    data, model = ShardData(digits, image_size=8, channels=1), model_of(cfg)
    units = ev.plan(cfg, ["reconstruction"], data, reference_cached=True)
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
    with pytest.raises(ValueError, match=r"reconstruction_draws in \[1, 1000\], got 12 and 0"):
        ev.plan(gen_cfg(digits, reconstruction_samples=12, reconstruction_draws=0), ["reconstruction"], data,
                reference_cached=True)


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
    assert len(ev.plan(cfg, ["reconstruction"], data, reference_cached=True)) == 4  # 2 draws x 2 solvers
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
        assert len(ev.plan(chunked, ["reconstruction"], data, reference_cached=True)) == 4 * (20 // chunk + 1)
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
    with pytest.raises(ValueError, match=r"eval/reconstruction_l2_euler10.*needs eval.fid_euler10=true"):
        ev.metric_for_key(gen_cfg(digits), "eval/reconstruction_l2_euler10")
