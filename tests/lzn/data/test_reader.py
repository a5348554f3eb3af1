"""lzn.data.reader's resizing: what the Ray Data stream and the evaluation stage read."""
import numpy as np

from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ShardDataset, match_channels, square_pixels
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
