"""The data stage on a real local Ray: shards encoded by Ray tasks, read by Ray Data."""
import json

import numpy as np
import pytest

from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ShardDataset
from lzn.data.shards import MANIFEST
from tests.lzn.data import builders

ray = pytest.importorskip("ray")


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


def _split_rows(splits) -> list[list[tuple[int, int]]]:
    """(pass, source_index) of every row each split yields, its consumers running at once
    (as Ray Train's workers do: a streaming split blocks until every split asks)."""
    import threading

    out = [[] for _ in splits]

    def consume(k):
        out[k] = [(int(p), int(i)) for b in splits[k].iter_batches(batch_size=None)
                  for p, i in zip(b["pass"], b["source_index"])]

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(len(splits))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    return out


def test_the_stream_holds_every_pass_of_the_run_in_one_dataset(local_ray, tmp_path):
    from orchestration.ray.data import pass_plan, passes_needed, read_shards, stream_passes

    builders.image_folder(tmp_path / "raw")  # 11 training images, 3 shards of at most 4 rows
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "shards", PrepareConfig(executor="serial", shard_rows=4))
    files = ShardDataset(tmp_path / "shards", "train").files
    plan = pass_plan(files, 3, seed=5)
    for p in range(3):  # each pass reads every file once, in the order RowGroupSampler's seed draws
        expected = np.random.default_rng([5, p]).permutation(len(files))
        assert [e["file"] for e in plan if e["pass"] == p] == [str(files[i]) for i in expected]
    assert [e["pass"] for e in plan] == sorted(e["pass"] for e in plan)  # pass by pass
    assert passes_needed(11, 4, 6) == 4 and passes_needed(11, 4, 0) == 1  # 24 rows of 11 a pass, one to spare

    one = read_shards(tmp_path / "shards", "train", image_size=8, channels=1).take_all()
    rows = stream_passes(tmp_path / "shards", "train", seed=5, passes=3, image_size=8, channels=1).take_all()
    assert len(rows) == 3 * len(one) == 33
    by_index = {r["source_index"]: np.asarray(r["image"]) for r in one}
    for p in range(3):  # every row once a pass, the same pixels as a single pass reads
        mine = [r for r in rows if r["pass"] == p]
        assert sorted(r["source_index"] for r in mine) == sorted(by_index)
        for r in mine:
            np.testing.assert_array_equal(np.asarray(r["image"]), by_index[r["source_index"]])
    with pytest.raises(ValueError, match="passes, or steps and global_batch"):
        stream_passes(tmp_path / "shards", "train", seed=5)


def test_split_over_two_workers_each_pass_gives_each_row_to_one_worker(local_ray, tmp_path):
    from orchestration.ray.data import stream_passes

    builders.image_folder(tmp_path / "raw")
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "shards", PrepareConfig(executor="serial", shard_rows=4))
    ds = stream_passes(tmp_path / "shards", "train", seed=0, passes=4, image_size=8, channels=1)
    first, second = _split_rows(ds.streaming_split(2, equal=True))
    assert len(first) == len(second) == 44 // 2  # equal=True, as Ray Train splits it
    assert not set(first) & set(second)  # within a pass no row reaches both workers
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert {p for p, _ in first + second} == {0, 1, 2, 3}


def test_streamed_batches_iterate_one_execution_across_passes(local_ray, tmp_path):
    import threading

    from lzn.data.batches import StepBatcher
    from orchestration.ray.data import stream_passes
    from orchestration.ray.train import StreamedBatches

    builders.image_folder(tmp_path / "raw")
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "shards", PrepareConfig(executor="serial", shard_rows=4))
    # 11 rows a pass, global batch 4: 2.75 steps a pass; 8 steps read about 3 passes
    ds = stream_passes(tmp_path / "shards", "train", seed=0, steps=8, global_batch=4, image_size=8, channels=1)
    splits, batches = ds.streaming_split(2, equal=True), [None, None]

    def run(rank):
        batcher = StepBatcher(global_batch=4, seed=0, augment="none", image_size=8, two_view=False, rank=rank,
                              world=2, pixel_max=255)
        stream = StreamedBatches(splits[rank], batcher, seed=0)
        batches[rank] = (stream, [stream(step)["images"] for step in range(8)])
        stream.close()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    for stream, images in batches:
        assert stream.executions == 1  # the passes follow one another in the execution the first step started
        assert len(images) == 8 and all(x.shape == (2, 1, 8, 8) for x in images)
        assert all(-1 <= x.min() and x.max() <= 1 for x in images)
