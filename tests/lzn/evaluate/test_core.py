"""lzn.evaluate.core: sharded evaluation gives the numbers of the unsharded one, parts resume,
metrics are checked against the objective, and a metric is whatever the registry holds."""
import pytest
import torch

from lzn import evaluate as ev
from lzn.data.reader import ImageSplit
from lzn.errors import UserError
from lzn.eval_data import InMemoryData, ShardData
from lzn.evaluate import core
from tests.lzn.evaluate.tasks import joint_cfg, model_of, run


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


def test_metrics_are_checked_against_the_objective(digits):
    cfg = joint_cfg(digits)
    assert ev.select_metrics(cfg, None) == ["fid", "classification", "conditional"]
    with pytest.raises(UserError, match=r"linear_probe.*do not apply to objective 'joint'.*classification"):
        ev.select_metrics(cfg, ["linear_probe"])
    with pytest.raises(UserError, match=r"\['fdi'\] are not known"):
        ev.select_metrics(cfg, ["fdi"])


def test_a_checkpoint_of_another_model_is_refused_by_name(digits, tmp_path):
    cfg = joint_cfg(digits)
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {"nothing": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(UserError, match="does not fit task 'joint_digits'"):
        ev.load_model(cfg, path, "cpu")


class MeanPixel(core.Metric):
    """A metric of this file only: the mean pixel of the held-out split, in units of rows."""

    name = "mean_pixel"
    objectives = ("joint",)
    kinds = ("pixels",)
    keys = ("eval/mean_pixel",)

    def plan(self, job):
        return core.units_of("pixels", job.data.size("test"), job.chunk)

    def run(self, evaluator, unit):
        images, _ = evaluator.data.rows("test", unit.lo, unit.hi)
        return {"sum": float(images.double().sum()) / images[0].numel(), "count": unit.hi - unit.lo}

    def reduce(self, job, parts):
        return {"eval/mean_pixel": parts.ratio("pixels", "sum")}


def test_the_metrics_are_registered_in_their_order():
    assert list(ev.METRICS) == ["fid", "linear_probe", "classification", "conditional", "reconstruction"]
    assert {m.name: type(m).__module__ for m in ev.METRICS.values()} == {
        name: f"lzn.evaluate.{name}" for name in ev.METRICS}  # one file per metric


def test_a_metric_registered_elsewhere_is_planned_run_and_reduced_by_the_core(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "METRICS", dict(core.METRICS))  # registered for this test only
    core.register(MeanPixel)
    torch.manual_seed(1)
    images, labels = torch.rand(37, 1, 8, 8) * 2 - 1, torch.zeros(37, dtype=torch.long)
    data = InMemoryData(ImageSplit(images[:5], labels[:5], images, labels))
    cfg = joint_cfg(digits, chunk_size=16)
    assert ev.select_metrics(cfg, None) == ["fid", "classification", "conditional", "mean_pixel"]
    assert [(u.lo, u.hi) for u in ev.plan(ev.Job(cfg, data), ["mean_pixel"])] == [(0, 16), (16, 32), (32, 37)]
    out = ev.evaluate_here(cfg, model_of(cfg), data, cache_dir=tmp_path / "cache", parts_dir=tmp_path / "p",
                           chosen=["mean_pixel"], progress=False)
    assert out == {"eval/mean_pixel": pytest.approx(float(images.double().mean()), rel=1e-12),
                   "eval/inference_batch_size": 8.0, "eval/alpha": 0.0}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pixels-00000.pt", "pixels-00001.pt",
                                                                  "pixels-00002.pt"]
    assert ev.metric_for_key(cfg, "eval/mean_pixel") == "mean_pixel"
    with pytest.raises(ValueError, match="'mean_pixel' is registered already"):
        core.register(MeanPixel)
    with pytest.raises(UserError, match=r"metrics=\['mean_pxl'\] are not known; expected some of \['fid', "
                                        r"'linear_probe', 'classification', 'conditional', 'reconstruction', "
                                        r"'mean_pixel'\]"):
        ev.select_metrics(cfg, ["mean_pxl"])
    with pytest.raises(UserError, match=r"'eval/mean_pxl' is not an evaluation metric; expected one of .*"
                                        r"'eval/mean_pixel'"):
        ev.metric_for_key(cfg, "eval/mean_pxl")
