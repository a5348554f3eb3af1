"""The prepare stage on a user's folder: images converted and resized to what the task's
model sees, a stratified seeded held-out split when the folder has none, both recorded in
the manifest; a split the user made is kept. Oracles: torchvision's Resize + CenterCrop
(the transforms API, not the functional one the prepare stage calls) and PIL's convert."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ShardDataset, in_memory_problem, load_pixels
from lzn.data.resize import Target
from lzn.data.shards import MANIFEST
from lzn.data.sources import SourceError
from tests.lzn.data.mixed_images import SHAPES, mixed_folder

SERIAL = PrepareConfig(executor="serial")
PER_CLASS = 21


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user") / "shapes"
    return root, mixed_folder(root, per_class=PER_CLASS)


def expected_pixels(path: str, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8 by the definition: PIL mode conversion, shorter side to
    `size` (bilinear, antialiased), centre crop."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(img.height, img.width, channels)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    if x.shape[1:] != (size, size):
        x = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)(x))
    return x.permute(1, 2, 0).numpy()


def stored(dataset_dir, split) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    ds = ShardDataset(dataset_dir, split)
    paths = [p for f in ds.files for p in pq.read_table(f, columns=["source_path"]).column(0).to_pylist()]
    pixels, _, _ = load_pixels(dataset_dir, split)
    return {p: pixels[i].permute(1, 2, 0).numpy() for i, p in enumerate(paths)}


@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_is_converted_and_resized_as_torchvision_does(folder, tmp_path, channels):
    root, written = folder
    out = tmp_path / "shapes"
    report = prepare_dataset("imagefolder", str(root), out, SERIAL, target=Target(16, channels), holdout=0.1,
                             progress=False)
    assert report.rejected == 0 and sum(report.rows.values()) == len(written)
    manifest = json.loads((out / MANIFEST).read_text())
    for split in ("train", "test"):
        assert manifest["splits"][split]["image_sizes"] == {f"16x16x{channels}": report.rows[split]}
        for path, pixels in stored(out, split).items():
            # v2's uint8 kernel and v1's float one round apart by at most one grey level
            diff = np.abs(pixels.astype(int) - expected_pixels(path, 16, channels).astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.5, path
    resize = manifest["resize"]
    assert (resize["size"], resize["channels"]) == (16, channels) and "antialias=True" in resize["method"]
    modes = {"RGB": 3, "L": 1, "P": 1, "RGBA": 4}
    want = {}
    for h, w, mode in written.values():
        want[f"{h}x{w}x{modes[mode]}"] = want.get(f"{h}x{w}x{modes[mode]}", 0) + 1
    got = {}
    for counts in resize["source_sizes"].values():
        for shape, n in counts.items():
            got[shape] = got.get(shape, 0) + n
    assert got == want and sum(resize["resized"].values()) == len(written)  # no source is 16x16
    # Over 2x the target size, yet the split fits in memory at the prepared size.
    assert any(h > 32 for h, _, _ in SHAPES)
    assert in_memory_problem(out, image_size=16, channels=channels) is None


def test_a_folder_without_split_gets_a_stratified_seeded_holdout(folder, tmp_path):
    root, written = folder
    a = prepare_dataset("imagefolder", str(root), tmp_path / "a", SERIAL, target=Target(8, 1), holdout=0.2,
                        holdout_seed=3, progress=False)
    k = round(0.2 * PER_CLASS)
    assert a.rows == {"train": 2 * (PER_CLASS - k), "test": 2 * k}
    held = json.loads((tmp_path / "a" / MANIFEST).read_text())["holdout"]
    assert held == {"from": "train", "to": "test", "fraction": 0.2, "seed": 3, "stratified_by": "class",
                    "counts": {c: {"train": PER_CLASS - k, "test": k} for c in ("disc", "square")}}
    train, test = set(stored(tmp_path / "a", "train")), set(stored(tmp_path / "a", "test"))
    assert not train & test and train | test == set(written)
    # The same seed, the same split; another seed, another one.
    prepare_dataset("imagefolder", str(root), tmp_path / "b", SERIAL, target=Target(8, 1), holdout=0.2,
                    holdout_seed=3, progress=False)
    assert set(stored(tmp_path / "b", "test")) == test
    prepare_dataset("imagefolder", str(root), tmp_path / "c", SERIAL, target=Target(8, 1), holdout=0.2,
                    holdout_seed=4, progress=False)
    assert set(stored(tmp_path / "c", "test")) != test


def test_a_split_the_user_made_is_kept(folder, tmp_path):
    root, _ = folder
    user = tmp_path / "user"
    for name in ("disc", "square"):
        files = sorted((root / name).iterdir())
        for split, part in (("train", files[:15]), ("test", files[15:])):
            (user / split / name).mkdir(parents=True)
            for f in part:
                shutil.copy(f, user / split / name / f.name)
    report = prepare_dataset("imagefolder", str(user), tmp_path / "kept", SERIAL, target=Target(8, 3), holdout=0.1,
                             progress=False)
    assert report.rows == {"train": 30, "test": 2 * (PER_CLASS - 15)}
    assert json.loads((tmp_path / "kept" / MANIFEST).read_text())["holdout"] is None


def test_a_flat_folder_of_images_is_split_for_generation(folder, tmp_path):
    root, _ = folder
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((root / "disc").iterdir()):
        shutil.copy(f, flat / f.name)
    report = prepare_dataset("imagefolder", str(flat), tmp_path / "f", SERIAL, target=Target(8, 1), holdout=0.1,
                             progress=False)
    assert report.rows == {"train": PER_CLASS - 2, "test": 2}  # round(2.1)
    manifest = json.loads((tmp_path / "f" / MANIFEST).read_text())
    assert manifest["classes"] == [] and manifest["holdout"]["counts"] == {"": {"train": PER_CLASS - 2, "test": 2}}


def test_a_holdout_that_holds_nothing_out_is_refused(tmp_path):
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(one / "a.png")
    with pytest.raises(SourceError, match="holds out no image"):
        prepare_dataset("imagefolder", str(tmp_path / "one"), tmp_path / "x", SERIAL, holdout=0.1, progress=False)
