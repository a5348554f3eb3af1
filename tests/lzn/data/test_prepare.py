"""The prepare stage and the shard readers, on raw datasets built in tmp."""
import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lzn.data import prepare as prepare_mod
from lzn.data.digits import digits_split
from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import RowGroupSampler, ShardDataset, load_split, load_training_split
from lzn.data.shards import MANIFEST, ShardError, verify_shards
from lzn.data.sources import SourceError
from tests.lzn.data import builders

SERIAL = PrepareConfig(executor="serial")


def pixels_of(ds: ShardDataset, i: int) -> np.ndarray:
    """Item i back as uint8 (H, W, C)."""
    x, _ = ds[i]
    return ((x + 1) / 2 * ds.pixel_max).round().to(torch.uint8).permute(1, 2, 0).numpy()


def rows(ds: ShardDataset) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in ds.files for r in pq.read_table(f, columns=["source_path", "label", "class_name",
                                                                   "encoding"]).to_pylist()]


def stats(folder):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def folder(tmp_path):
    good = builders.image_folder(tmp_path / "raw")
    return tmp_path / "raw", good


def test_image_folder_reads_back_pixel_exact_and_lists_bad_files(folder, tmp_path):
    raw, good = folder
    report = prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    assert report.rows == {"train": 11, "val": 4} and report.rejected == 3
    manifest = json.loads((tmp_path / "pets" / MANIFEST).read_text())
    rejected = {os.path.basename(r["path"]): r["reason"] for r in manifest["splits"]["train"]["rejected"]}
    assert set(rejected) == {"corrupt.png", "truncated.png", "notes.png"}
    assert "truncated" in rejected["truncated.png"] and "UnidentifiedImageError" in rejected["notes.png"]
    assert manifest["classes"] == ["cat", "dog"] and manifest["splits"]["val"]["classes"] == {"cat": 2, "dog": 2}
    assert manifest["splits"]["train"]["encodings"] == {"raw": 10, "jpeg": 1}  # 80 px > raw_max_side
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "pets", split)
        for i, row in enumerate(rows(ds)):
            np.testing.assert_array_equal(pixels_of(ds, i), good[row["source_path"]])
            assert ds[i][1] == ["cat", "dog"].index(row["class_name"]) == row["label"]


def test_rerun_rewrites_nothing_and_changed_input_is_picked_up(folder, tmp_path):
    raw, _ = folder
    prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    before = stats(tmp_path / "pets")
    again = prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    assert again.up_to_date and again.written == 0 and stats(tmp_path / "pets") == before

    builders._save(builders._image(np.random.default_rng(1), 12, "RGB"), raw / "val" / "cat" / "new.png", "PNG")
    changed = prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    assert not changed.up_to_date and changed.rows["val"] == 5
    train_shard = tmp_path / "pets" / "train" / "part-00000.parquet"
    assert stats(tmp_path / "pets")[train_shard] == before[train_shard]  # an unchanged shard is kept


def test_altered_shard_is_detected_and_repaired(folder, tmp_path):
    raw, good = folder
    prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    shard = tmp_path / "pets" / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    assert [p for p, _ in verify_shards(tmp_path / "pets")] == [shard]
    with pytest.raises(ShardError, match="SHA-256"):
        ShardDataset(tmp_path / "pets", "train", verify=True)
    report = prepare_dataset("imagefolder", str(raw), tmp_path / "pets", SERIAL)
    assert report.repaired == [str(shard)] and report.written == 1
    ds = ShardDataset(tmp_path / "pets", "train", verify=True)
    for i, row in enumerate(rows(ds)):
        np.testing.assert_array_equal(pixels_of(ds, i), good[row["source_path"]])


def _prepare_slowly(raw, out):
    write = prepare_mod.write_shard

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return write(*args, **kwargs)

    prepare_mod.write_shard = slow
    prepare_dataset("imagefolder", str(raw), out, PrepareConfig(executor="serial", shard_rows=1), progress=False)


def test_killed_run_leaves_no_dataset_and_resumes(folder, tmp_path):
    raw, good = folder
    out = tmp_path / "pets"
    child = multiprocessing.get_context("fork").Process(target=_prepare_slowly, args=(raw, out))
    child.start()
    deadline = time.time() + 60
    while len(list((out / "train").glob("part-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    finished = stats(out)
    done = [p for p in finished if p.name.startswith("part-")]
    assert len(done) >= 3 and not (out / MANIFEST).exists()
    with pytest.raises(ShardError, match="prepare"):
        ShardDataset(out, "train")

    report = prepare_dataset("imagefolder", str(raw), out, PrepareConfig(executor="serial", shard_rows=1))
    assert report.reused == len(done) and report.written == 18 - len(done)  # 18 files, one shard each
    assert all(stats(out)[p] == finished[p] for p in done)  # finished shards were kept as they were
    assert not list(out.rglob(".*.tmp"))
    ds = ShardDataset(out, "train", verify=True)
    assert len(ds) == 11
    for i, row in enumerate(rows(ds)):
        np.testing.assert_array_equal(pixels_of(ds, i), good[row["source_path"]])


def test_process_pool_writes_the_same_shards_as_serial(folder, tmp_path):
    raw, _ = folder
    cfg = dict(shard_rows=4)
    prepare_dataset("imagefolder", str(raw), tmp_path / "a", PrepareConfig(executor="serial", **cfg))
    prepare_dataset("imagefolder", str(raw), tmp_path / "b", PrepareConfig(executor="process", workers=2, **cfg))
    shards = lambda d: [(s["file"], s["sha256"]) for e in json.loads((d / MANIFEST).read_text())["splits"].values()
                        for s in e["shards"]]
    assert shards(tmp_path / "a") == shards(tmp_path / "b") and len(shards(tmp_path / "a")) == 5


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10_archive_and_folder(tmp_path, archive):
    expected = builders.cifar10(tmp_path / "raw", archive=archive)
    if archive:  # only the archive remains
        import shutil

        shutil.rmtree(tmp_path / "raw" / "cifar-10-batches-py")
    prepare_dataset("cifar10", str(tmp_path / "raw"), tmp_path / "cifar10", SERIAL)
    manifest = json.loads((tmp_path / "cifar10" / MANIFEST).read_text())
    assert manifest["classes"] == builders.CIFAR_CLASSES
    for split, (pixels, labels) in expected.items():
        images, got = load_split(tmp_path / "cifar10", split)
        np.testing.assert_array_equal(((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1), pixels)
        np.testing.assert_array_equal(got, labels)


def test_cifar10_corrupt_batch_is_skipped_and_listed(tmp_path):
    builders.cifar10(tmp_path / "raw", archive=False, per_batch=4)
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    report = prepare_dataset("cifar10", str(tmp_path / "raw"), tmp_path / "c", SERIAL)
    assert report.rows == {"train": 16, "test": 4} and report.rejected == 1
    rejected = json.loads((tmp_path / "c" / MANIFEST).read_text())["splits"]["train"]["rejected"]
    assert rejected[0]["path"].endswith("data_batch_3")


@pytest.mark.parametrize("extracted", [False, True])
def test_imagenet_archives_and_extracted_layout(tmp_path, extracted):
    expected = builders.imagenet(tmp_path / "raw", extracted=extracted)
    prepare_dataset("imagenet", str(tmp_path / "raw"), tmp_path / "imagenet", SERIAL)
    manifest = json.loads((tmp_path / "imagenet" / MANIFEST).read_text())
    assert manifest["classes"] == builders.WNIDS
    for split, items in expected.items():
        ds = ShardDataset(tmp_path / "imagenet", split)
        assert len(ds) == len(items)
        for i, (jpeg, wnid) in enumerate(items):
            np.testing.assert_array_equal(pixels_of(ds, i), builders.decode(jpeg))
            assert ds[i][1] == builders.WNIDS.index(wnid)
        order = list(range(len(ds)))[::-1]  # a DataLoader batch of encoded rows, in one call
        for i, (x, y) in zip(order, ds.__getitems__(order)):
            assert torch.equal(x, ds[i][0]) and y == ds[i][1]
    assert manifest["splits"]["val"]["encodings"] == {"jpeg": 4}  # stored as the archive held them


def test_missing_root_and_empty_dataset_show_the_expected_layout(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist.*\n.*<class>/<image>"):
        prepare_dataset("imagefolder", str(tmp_path / "nowhere"), tmp_path / "x", SERIAL)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"no images found.*\n.*<class>/<image>"):
        prepare_dataset("imagefolder", str(tmp_path / "empty"), tmp_path / "x", SERIAL)
    (tmp_path / "bare").mkdir()
    with pytest.raises(SourceError, match="ILSVRC2012_img_train.tar"):
        prepare_dataset("imagenet", str(tmp_path / "bare"), tmp_path / "x", SERIAL)
    with pytest.raises(SourceError, match="cifar-10-python.tar.gz"):
        prepare_dataset("cifar10", None, tmp_path / "x", SERIAL)


def test_digits_shards_hold_exactly_the_digits_split(tmp_path):
    prepare_dataset("digits", None, tmp_path / "digits", PrepareConfig())
    got, ref = load_training_split(tmp_path / "digits", image_size=8, channels=1), digits_split()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(got, key), getattr(ref, key)), key
    with pytest.raises(ShardError, match="32x32x3"):
        load_training_split(tmp_path / "digits", image_size=32, channels=3)


def test_samplers_partition_the_split_and_read_the_right_items(tmp_path):
    prepare_dataset("digits", None, tmp_path / "digits", PrepareConfig(shard_rows=200))
    ds = ShardDataset(tmp_path / "digits", "train", cache_mb=0.01)
    ref = digits_split()
    assert len(ds.groups) >= 7
    parts = [list(RowGroupSampler(ds, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 629 and set(parts[0]) | set(parts[1]) == set(range(1257))
    sampler = RowGroupSampler(ds, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == list(range(1257)) and list(sampler) != first
    for r in (0, 1):
        loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds, num_replicas=2, rank=r, seed=1),
                            num_workers=1)
        idx = list(DistributedSampler(ds, num_replicas=2, rank=r, seed=1))
        images, labels = map(torch.cat, zip(*loader))
        assert torch.equal(images, ref.train_images[idx]) and torch.equal(labels, ref.train_labels[idx])
