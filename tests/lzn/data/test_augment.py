"""The two-view augmentations: the SimCLR pipeline as the reference's (blur always, kernel 23
at 224), views cropped from full-resolution images of any size, and one code path for
batches of one size (digits) and of mixed sizes (ImageNet)."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from lzn.data.augment import augment_batch, blur_kernel, build_augment, crops_any_size
from lzn.data.batches import StepBatcher
from lzn.data.digits import digits_split
from lzn.data.reader import square_pixels, to_float


def test_blur_is_the_references_always_applied_kernel_23_at_224():
    # The reference (lzn/data/imagenet_aug.py:34): T.GaussianBlur(kernel_size=23) in the
    # Compose, not inside a RandomApply, with torchvision's default sigma (0.1, 2.0).
    assert blur_kernel(224) == 23 == int(0.1 * 224) + 1
    assert all(blur_kernel(s) % 2 == 1 for s in range(8, 600))  # a Gaussian kernel needs a centre
    steps = build_augment("simclr", 224).transforms
    blurs = [t for t in steps if isinstance(t, v2.GaussianBlur)]
    assert len(blurs) == 1 and list(blurs[0].kernel_size) == [23, 23] and list(blurs[0].sigma) == [0.1, 2.0]
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur) for t in steps)


def _band_image(height: int, width: int, band: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: mid-grey with a white band of `band` columns at the left edge."""
    x = torch.zeros(3, height, width)
    x[:, :, :band] = 1.0
    return x


def test_views_crop_the_full_field_of_view_not_a_centre_square():
    # A 2:1 image whose only structure is a band at its left edge. Squared first (the old
    # stream: shorter side to 32, centre crop) no view can see the band; cropped from the
    # full image, many views do. Grey is a fixed point of the colour jitter and grayscale,
    # so a view without the band is flat.
    full = _band_image(64, 256, band=40)
    n = 64
    kw = dict(seed=1, step=0, positions=torch.arange(n), total=n)
    aug = build_augment("simclr", 32)
    views = augment_batch(aug, [full] * n, **kw)
    assert views.shape == (n, 3, 32, 32)
    pixels = ((full.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    squared = to_float(square_pixels(pixels, 32), 255)
    old = augment_batch(aug, [squared] * n, **kw)
    edge = lambda v: v.std(dim=(1, 2, 3)) > 0.05  # noqa: E731
    assert edge(old).sum() == 0
    assert edge(views).sum() >= 4  # 9 of 64 here: crops near the left edge (40 of 256 columns)


def test_mixed_sizes_are_cropped_per_sample_deterministically_and_rank_invariantly():
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 60), (33, 33), (80, 20), (50, 70), (64, 48), (21, 90), (36, 36), (100, 45)]
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]
    labels = torch.arange(8)

    def views(rank, world):
        b = StepBatcher(global_batch=8, seed=5, augment="simclr", image_size=16, two_view=True,
                        rank=rank, world=world)
        part = len(images) // world
        return b(images[rank * part : (rank + 1) * part], labels[rank * part : (rank + 1) * part], step=3)["views"]

    one = views(0, 1)
    assert one.shape == (2, 8, 3, 16, 16) and one.min() >= -1 and one.max() <= 1
    assert torch.equal(views(0, 1), one)
    assert torch.equal(torch.cat([views(r, 2) for r in (0, 1)], dim=1), one)
    assert (one[0] - one[1]).abs().mean() > 0.05  # two different views of each image


def test_digits_take_the_same_path_as_a_list_or_a_stacked_batch():
    split = digits_split()
    x, y = split.train_images[:16], split.train_labels[:16]
    b = StepBatcher(global_batch=16, seed=2, augment="simclr_digits", image_size=8, two_view=True)
    assert torch.equal(b(list(x), y, step=1)["views"], b(x, y, step=1)["views"])
    assert not crops_any_size("simclr_digits") and crops_any_size("simclr")


@pytest.mark.parametrize("augment", ["none", "flip", "simclr_digits"])
def test_mixed_sizes_without_a_cropping_augmentation_are_refused(augment):
    b = StepBatcher(global_batch=2, seed=0, augment=augment, image_size=8, two_view=False)
    with pytest.raises(ValueError, match=r"sizes \[\(1, 8, 8\), \(1, 8, 9\)\] cannot be stacked"):
        b([torch.zeros(1, 8, 8), torch.zeros(1, 8, 9)], torch.zeros(2, dtype=torch.long), step=0)
    with pytest.raises(ValueError, match="unknown augmentation 'simclr2'"):
        crops_any_size("simclr2")
