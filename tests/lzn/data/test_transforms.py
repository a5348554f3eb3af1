"""The batched image transforms, each against torchvision.transforms.v2.functional applied
per sample with that sample's parameter."""
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from lzn.data.transforms import (adjust_hue, blend_ops_, gaussian_blur, grayscale, resize_weights,
                                 resized_crops)

# float32 rounding of the same sums taken in another order (or weights divided rather than
# multiplied): ~1e-7 per operation on values <= 1, a few operations deep.
ATOL = 1e-5


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_resize_weights_are_a_normalised_filter_and_the_identity_at_scale_one():
    w = resize_weights(torch.tensor([3, 0]), torch.tensor([17, 8]), 8, 20)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 8))
    assert (w[0, :, :3] == 0).all() and (w[0, :, 20:] == 0).all()  # nothing outside the crop [3, 20)
    torch.testing.assert_close(w[1, :, :8], torch.eye(8), atol=0, rtol=0)


@pytest.mark.parametrize("batched", [True, False])
def test_resized_crops_match_torchvision_upscaling_and_downscaling(batched):
    # Crops smaller than 16 px are upscaled (antialiasing is inactive: plain bilinear), larger
    # ones downscaled (torchvision's triangle filter widened by the scale). Both routes
    # implement that very filter (one as matrices, one by calling it), so downscaling is
    # held as tightly as upscaling: a filter that only approximates it (a box average of
    # bilinear taps, as roi_align's) would be off by ~1e-2 on this noise.
    x = _rand(6, 3, 60, 80)
    boxes = torch.tensor([[5, 7, 9, 12], [0, 0, 60, 80], [10, 20, 16, 16], [3, 50, 40, 30], [59, 79, 1, 1],
                          [20, 0, 33, 61]])
    flip = torch.tensor([False, True, False, True, False, True])
    out = resized_crops(x, boxes, 16, flip, batched=batched)
    assert out.shape == (6, 3, 16, 16)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = F.resized_crop(x[b], top, left, h, w, [16, 16], antialias=True)
        ref = F.hflip(ref) if flip[b] else ref
        torch.testing.assert_close(out[b], ref, atol=ATOL, rtol=0)


def test_resized_crops_of_a_list_of_sizes_equal_torchvision_exactly():
    # The per-sample route calls the kernel torchvision's resize calls, on a view of the crop.
    images = [_rand(3, h, w, seed=h) for h, w in [(30, 50), (12, 9), (70, 40)]]
    boxes = torch.tensor([[2, 3, 25, 40], [0, 0, 12, 9], [5, 1, 64, 39]])
    out = resized_crops(images, boxes, 16)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        assert torch.equal(out[b], F.resized_crop(images[b], top, left, h, w, [16, 16], antialias=True))


def test_grayscale_is_itu_r_601():
    x = _rand(4, 3, 5, 6)
    torch.testing.assert_close(grayscale(x), F.rgb_to_grayscale(x), atol=0, rtol=0)
    one = _rand(2, 1, 5, 6)
    assert grayscale(one) is one


@pytest.mark.parametrize("channels", [3, 1])
def test_blend_ops_are_brightness_contrast_saturation(channels):
    x = _rand(8, channels, 9, 7, seed=1)
    op = torch.tensor([0, 1, 2, -1, 0, 1, 2, 3])
    factor = torch.tensor([0.2, 1.8, 0.5, 1.5, 1.7, 0.3, 1.9, 0.4])
    ref = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]
    expected = torch.stack([ref[o](img, float(f)) if 0 <= o <= 2 else img for img, o, f in zip(x, op.tolist(), factor)])
    out = blend_ops_(x.clone(), op, factor)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_hue_matches_torchvision_including_grey_pure_and_tied_pixels():
    x = _rand(7, 3, 6, 8, seed=2)
    x[0] = 0.5  # grey: no hue
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure colours and ties between the largest channels
    x[1, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    x[1, :, 0, 2] = torch.tensor([0.0, 0.0, 1.0])
    x[1, :, 0, 3] = torch.tensor([0.7, 0.7, 0.2])
    x[1, :, 0, 4] = torch.tensor([0.3, 0.8, 0.8])
    x[1, :, 0, 5] = torch.tensor([0.9, 0.1, 0.9])
    x[2] = torch.round(x[2] * 4) / 4  # many ties
    shift = torch.tensor([0.3, 0.2, -0.2, 0.5, -0.5, 0.0, 0.123])
    out = adjust_hue(x, shift)
    for b in range(7):
        torch.testing.assert_close(out[b], F.adjust_hue(x[b], float(shift[b])), atol=ATOL, rtol=0)
    one = x[:, :1]
    assert adjust_hue(one, shift) is one  # no hue to turn


@pytest.mark.parametrize("kernel", [3, 23])
def test_blur_matches_torchvision_per_sigma(kernel):
    x = _rand(5, 3, 32, 40, seed=3)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = gaussian_blur(x, kernel, sigma)
    for b in range(5):
        s = float(sigma[b])
        torch.testing.assert_close(out[b], F.gaussian_blur(x[b], [kernel, kernel], [s, s]), atol=ATOL, rtol=0)
    assert torch.equal(gaussian_blur(x, 1, sigma), x)
