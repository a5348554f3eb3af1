"""The data stage on a real local Ray: shards encoded by Ray tasks, read by Ray Data."""
import json

import numpy as np
import pytest

from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ShardDataset
from lzn.data.shards import MANIFEST
from tests.lzn.data import builders

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_ray_tasks_write_the_same_shards_and_ray_data_reads_them(local_ray, tmp_path):
    from orchestration.ray.data import ray_map, read_shards

    good = builders.image_folder(tmp_path / "raw")
    cfg = PrepareConfig(shard_rows=4)
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "serial", PrepareConfig(executor="serial", shard_rows=4))
    report = prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "ray", cfg, map_fn=ray_map())
    assert report.written == 5 and report.rejected == 3
    shards = lambda d: [(s["file"], s["sha256"]) for e in json.loads((d / MANIFEST).read_text())["splits"].values()
                        for s in e["shards"]]
    assert shards(tmp_path / "ray") == shards(tmp_path / "serial")

    rows = sorted(read_shards(tmp_path / "ray", "train").take_all(), key=lambda r: r["source_index"])
    ds = ShardDataset(tmp_path / "ray", "train")
    assert len(rows) == len(ds) == 11
    import pyarrow.parquet as pq

    paths = [p for f in ds.files for p in pq.read_table(f, columns=["source_path"]).column(0).to_pylist()]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(np.asarray(row["image"]), good[paths[i]])
        assert row["label"] == ds[i][1]


def test_read_shards_makes_mixed_sizes_and_channels_square(local_ray, tmp_path):
    from orchestration.ray.data import read_shards

    builders.image_folder(tmp_path / "raw")  # 12 px grey and RGB PNGs, one 80 px JPEG
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "shards", PrepareConfig(executor="serial"))
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert len(manifest["splits"]["train"]["image_sizes"]) > 2  # the input really is mixed
    rows = read_shards(tmp_path / "shards", "train", image_size=8, channels=3).take_all()
    assert len(rows) == 11 and {np.asarray(r["image"]).shape for r in rows} == {(8, 8, 3)}
    grey = read_shards(tmp_path / "shards", "train", image_size=8, channels=1).take_all()
    assert {np.asarray(r["image"]).shape for r in grey} == {(8, 8, 1)}


def test_read_shards_keeps_full_resolution_for_cropping_augmentations(local_ray, tmp_path):
    from orchestration.ray.data import read_shards

    builders.image_folder(tmp_path / "raw")  # 12 px grey and RGB PNGs, one 80 px JPEG
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "shards", PrepareConfig(executor="serial"))
    rows = read_shards(tmp_path / "shards", "train", image_size=8, channels=3, full_resolution=True).take_all()
    assert len(rows) == 11 and {np.asarray(r["image"]).shape[:2] for r in rows} == {(12, 12), (80, 80)}
    assert {np.asarray(r["image"]).shape[2] for r in rows} == {3}  # grey images matched to RGB
    assert max(np.asarray(r["image"]).shape[1] for r in rows) == 80  # the large JPEG, not squared to 8


def test_match_batch_keeps_sizes_and_matches_channels():
    from orchestration.ray.data import _match_batch

    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros((5, 7, 1), np.uint8), np.zeros((9, 4, 3), np.uint8)]
    out = _match_batch({"image": ragged, "label": np.arange(2)}, channels=3)
    assert [img.shape for img in out["image"]] == [(5, 7, 3), (9, 4, 3)]
    same = _match_batch({"image": np.zeros((2, 5, 5, 1), np.uint8)}, channels=3)
    assert same["image"].shape == (2, 5, 5, 3) and same["image"].dtype == np.uint8
