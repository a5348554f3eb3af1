"""lzn.evaluate.fid: the image-set metrics of the generated set (and its Euler-10 twin) from
parts that merge into the statistics of the whole, against reference statistics cached by
manifest and extractor."""
import json
import re

import pytest
import torch

from lzn import evaluate as ev
from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.shards import MANIFEST, dataset_checksum
from lzn.errors import UserError
from lzn.eval_data import ShardData
from lzn.metrics import FeatureMoments, feature_moments, feature_stats
from tests.lzn.evaluate.tasks import gen_cfg, joint_cfg, model_of, run


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
    before = dataset_checksum(digits)
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (digits / MANIFEST).write_text(json.dumps(manifest))
    try:
        assert dataset_checksum(digits) != before
        _, calls = run(cfg, data, tmp_path / "c")
        assert [n for n in calls[0] if n.startswith("reference")]  # recomputed for the new manifest
        now = sorted(stats.glob("digits_cnn-*-8x8x1-*.pt"))
        assert len(now) == 1 and now != cached and not old_format.exists()  # the stale statistics are gone
    finally:
        prepare_dataset("digits", None, digits, PrepareConfig(executor="serial"), progress=False)


def test_the_same_data_prepared_again_keeps_its_checksum(digits):
    manifest = json.loads((digits / MANIFEST).read_text())
    before = dataset_checksum(digits)
    manifest["created"] = "1999-01-01T00:00:00+0000"
    (digits / MANIFEST).write_text(json.dumps(manifest))
    assert dataset_checksum(digits) == before


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
    with pytest.raises(UserError, match=r"eval/fid_euler10.*needs eval.fid_euler10=true"):
        ev.metric_for_key(joint_cfg(digits), "eval/fid_euler10")
    with pytest.raises(UserError, match=r"eval/recall.*needs eval.kid_pr_samples > 0, got 0"):
        ev.metric_for_key(joint_cfg(digits, kid_pr_samples=0), "eval/recall")
    off = ev.evaluate_here(joint_cfg(digits, kid_pr_samples=0, is_splits=4), model, data,
                           cache_dir=tmp_path / "cache", parts_dir=tmp_path / "c", chosen=["fid"], progress=False)
    assert "eval/kid" not in off and off["eval/fid"] == pytest.approx(out["eval/fid"], rel=1e-9)
