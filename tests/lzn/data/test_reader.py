"""lzn.data.reader's resizing and its uint8 reads: what the streams, the in-memory trainer and the
evaluation stage read."""
import numpy as np
import pytest

from lzn.data.prepare import PrepareConfig, prepare_dataset
import torch

from lzn.data import reader
from lzn.data.digits import digits_raw_split, digits_split
from lzn.data.reader import (ShardDataset, in_memory_problem, load_pixel_split, match_channels, resize_centre_crop,
                             square_pixels, to_float)
from tests.lzn.data import builders


def test_square_resizes_the_shorter_side_and_crops_the_centre():
    flat = np.full((20, 40, 3), 77, np.uint8)
    out = square_pixels(flat, 10)
    assert out.shape == (10, 10, 3) and (out == 77).all()
    # Left half dark, right half bright: the centre crop of a 2:1 image keeps both halves' middle.
    halves = np.zeros((20, 40, 1), np.uint8)
    halves[:, 20:] = 200
    out = square_pixels(halves, 10)
    assert out[:, :4].max() == 0 and out[:, 6:].min() == 200
    exact = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert square_pixels(exact, 4) is exact  # the right size already: untouched


def test_channels_are_matched_both_ways():
    grey = np.full((2, 2, 1), 9, np.uint8)
    assert match_channels(grey, 3).shape == (2, 2, 3) and (match_channels(grey, 3) == 9).all()
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 100
    assert match_channels(rgb, 1)[0, 0, 0] == 30  # 0.299 * 100


def test_a_row_range_is_read_squared(tmp_path):
    builders.image_folder(tmp_path / "raw", per_class=3, size=12)
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "ds", PrepareConfig(executor="serial"),
                    progress=False)
    ds = ShardDataset(tmp_path / "ds", "train")
    images, labels = ds.squared(1, 4, image_size=8, channels=1)
    assert images.shape == (3, 1, 8, 8) and labels.tolist() == [ds[i][1] for i in range(1, 4)]
    assert images.min() >= -1 and images.max() <= 1


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 of low frequencies only, where PIL's and torch's bilinear filters agree."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    img = [127 + 100 * np.sin(2 * np.pi * (1.5 * x + phase[c, 0])) * np.cos(2 * np.pi * (y + phase[c, 1]))
           for c in range(3)]
    return np.stack(img, -1).round().astype(np.uint8)


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (256, 256), (300, 301)])
def test_resize_256_centre_crop_224_is_torchvisions_imagenet_eval_transform(shape):
    # The reference's evaluation images (lzn/data/imagenet_aug.py:39-46): T.Resize(256) then
    # T.CenterCrop(224) of the PIL image.
    from PIL import Image
    from torchvision import transforms as T

    image = _smooth(*shape, seed=sum(shape))
    expected = np.asarray(T.CenterCrop(224)(T.Resize(256)(Image.fromarray(image)))).astype(np.float64)
    out = square_pixels(image, 224, 256)
    assert out.shape == (224, 224, 3)
    assert np.abs(out - expected).mean() < 1.0 and np.abs(out - expected).max() <= 4


def test_resize_below_the_crop_is_refused_and_tensors_are_cropped_alike():
    with pytest.raises(ValueError, match="shorter side 200 cannot hold a 224 px crop"):
        square_pixels(np.zeros((300, 300, 3), np.uint8), 224, 200)
    image = _smooth(16, 16, seed=0)
    as_tensor = to_float(image[None], 255)
    np.testing.assert_allclose(resize_centre_crop(as_tensor, 20)[0].numpy(),
                               to_float(square_pixels(image, 16, 20), 255).numpy(), atol=1 / 127.5 + 1e-6)
    assert resize_centre_crop(as_tensor, None) is as_tensor
    with pytest.raises(ValueError, match="resize must be >= the images' size 16, got 12"):
        resize_centre_crop(as_tensor, 12)


def test_full_resolution_rows_keep_their_size(tmp_path):
    builders.image_folder(tmp_path / "raw", per_class=3, size=12)
    prepare_dataset("imagefolder", str(tmp_path / "raw"), tmp_path / "ds", PrepareConfig(executor="serial"),
                    progress=False)
    ds = ShardDataset(tmp_path / "ds", "train")
    rows = list(range(len(ds)))
    stored, _ = ds.pixels(rows)
    full, labels = ds.pixel_batch(rows, image_size=8, channels=3, full_resolution=True)
    assert isinstance(full, list) and {tuple(x.shape) for x in full} == {(3, 12, 12), (3, 80, 80)}
    for x, p in zip(full, stored):
        assert x.dtype == torch.uint8 and np.array_equal(x[0].numpy(), p[..., 0])  # channel 0 as stored
    squared, _ = ds.pixel_batch(rows, image_size=8, channels=1)
    assert squared.shape == (len(rows), 1, 8, 8) and squared.dtype == torch.uint8
    as_float, _ = ds.squared_at(rows, image_size=8, channels=1)
    torch.testing.assert_close(squared.float() * (2 / ds.pixel_max) - 1, as_float, rtol=0, atol=1e-6)


def test_the_training_split_is_held_as_stored_and_read_as_float_per_row(tmp_path):
    prepare_dataset("digits", None, tmp_path / "digits", PrepareConfig())
    split, raw, ref = load_pixel_split(tmp_path / "digits", image_size=8, channels=1), digits_raw_split(), digits_split()
    assert split.pixel_max == 16 and split.train_pixels.dtype == torch.uint8
    assert torch.equal(split.train_pixels[:, 0], torch.from_numpy(raw["train"][0]))  # the digits' own 0..16
    assert torch.equal(split.test_labels, ref.test_labels)
    # Read as an ImageSplit is: (x / 16) * 2 - 1, only the rows asked for.
    rows = torch.tensor([5, 0, 1256])
    assert torch.equal(split.train_images[rows], ref.train_images[rows])
    assert torch.equal(split.test_images[:7], ref.test_images[:7])
    assert len(split.train_images) == 1257 and split.test_images.shape == (540, 1, 8, 8)


def test_the_in_memory_limit_counts_the_bytes_of_uint8(tmp_path, monkeypatch):
    prepare_dataset("digits", None, tmp_path / "digits", PrepareConfig())
    size = (1257 + 540) * 8 * 8  # one byte a pixel: 115,008 bytes
    monkeypatch.setattr(reader, "IN_MEMORY_LIMIT_GB", size / 1e9)
    assert in_memory_problem(tmp_path / "digits", image_size=8, channels=1) is None
    monkeypatch.setattr(reader, "IN_MEMORY_LIMIT_GB", (size - 1) / 1e9)
    assert "as uint8" in in_memory_problem(tmp_path / "digits", image_size=8, channels=1)
