"""The CPU route's one-image transforms, each against torchvision.transforms.v2.functional
with the same parameter."""
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from lzn.data import image_ops

# float32 rounding of the same sums in another order: ~1e-7 per operation on values <= 1.
ATOL = 1e-5


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("factor", [0.2, 0.7, 1.0, 1.8])
def test_blends_are_brightness_contrast_saturation(channels, factor):
    x = _rand(channels, 9, 13, seed=1)
    for ours, ref in [(image_ops.brightness_, F.adjust_brightness), (image_ops.contrast_, F.adjust_contrast),
                      (image_ops.saturation_, F.adjust_saturation)]:
        torch.testing.assert_close(ours(x.clone(), factor), ref(x, factor), atol=ATOL, rtol=0)


def test_hue_matches_torchvision_including_grey_pure_and_tied_pixels():
    x = _rand(3, 12, 16, seed=2)
    x[:, 0, :4] = 0.5  # grey: no hue
    for col, rgb in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.7, 0.7, 0.2), (0.3, 0.8, 0.8), (0.9, 0.1, 0.9),
                               (1, 1, 1), (0, 0, 0)]):
        x[:, 1, col] = torch.tensor(rgb)  # pure colours and ties between the largest channels
    x[:, 2:5] = torch.round(x[:, 2:5] * 4) / 4  # many ties
    # Shifts that turn every sector across the wrap at 0 / 6 both ways, and the extremes.
    for shift in [0.0, 0.2, -0.2, 0.123, -0.05, 0.5, -0.5, 0.33]:
        torch.testing.assert_close(image_ops.hue_(x.clone(), shift), F.adjust_hue(x, shift), atol=ATOL, rtol=0)
    one = x[:1]
    assert image_ops.hue_(one, 0.3) is one  # no hue to turn


def test_blur_taps_are_torchvisions_kernel_without_its_negligible_tails():
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    taps = image_ops.blur_taps(23, sigma)
    for s, kept in zip(sigma.tolist(), taps):
        lim = 22 / (2.0 * 2.0 ** 0.5)  # torchvision's _get_gaussian_kernel1d
        full = torch.softmax(-(torch.linspace(-lim, lim, 23) / s) ** 2, dim=0)
        r = len(kept) // 2
        assert len(kept) % 2 == 1 and kept == kept[::-1]
        torch.testing.assert_close(torch.tensor(kept), full[11 - r : 12 + r], atol=1e-7, rtol=1e-5)
        dropped = torch.cat([full[: 11 - r], full[12 + r :]])
        assert (dropped < image_ops.TAP_FLOOR * 1.01).all() and dropped.sum() < 2.0 ** -35
    assert len(taps[0]) < 23 == len(taps[-1])  # sigma 0.1 keeps a few taps, sigma 2 all of them


def test_band_matrix_is_a_convolution_over_blocks():
    taps = [0.1, 0.2, 0.4, 0.2, 0.1]
    band = image_ops.band_matrix(taps, 4)
    assert band.shape == (4, 8)
    signal = _rand(8, seed=4)
    direct = torch.nn.functional.conv1d(signal.view(1, 1, -1), torch.tensor(taps).view(1, 1, -1)).view(-1)
    torch.testing.assert_close(band @ signal, direct, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(32, 40), (30, 26), (17, 23)])
def test_blur_matches_torchvision_per_sigma_and_kernel(size):
    # Sizes that the blocks of 16 tile, that need other blocks (30 = 15 x 2, 26 = 13 x 2),
    # and primes (blocks of 1).
    x = _rand(3, *size, seed=3)
    for kernel in (3, 23):
        sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
        for s, taps in zip(sigma.tolist(), image_ops.blur_taps(kernel, sigma)):
            out = image_ops.gaussian_blur_into(torch.empty_like(x), x, taps)
            torch.testing.assert_close(out, F.gaussian_blur(x, [kernel, kernel], [s, s]), atol=ATOL, rtol=0)


def test_blur_into_maps_to_its_range_and_spreads_a_grey_plane():
    x = _rand(3, 32, 32, seed=5)
    gray = F.rgb_to_grayscale(x)
    taps = image_ops.blur_taps(23, torch.tensor([1.3]))[0]
    out = image_ops.gaussian_blur_into(torch.empty(3, 32, 32), gray, taps, scale=2.0, shift=-1.0)
    ref = F.gaussian_blur(F.rgb_to_grayscale(x, num_output_channels=3), [23, 23], [1.3, 1.3]) * 2 - 1
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert out.min() >= -1 and out.max() <= 1
    bright = image_ops.gaussian_blur_into(torch.empty(1, 32, 32), torch.ones(1, 32, 32) * 2, taps)
    assert torch.equal(bright, torch.ones(1, 32, 32))  # clamped to [0, 1]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_into_is_torchvisions_resized_crop_mapped_to_unit_range(flip):
    image = _rand(3, 60, 80, seed=6) * 2 - 1
    for box in [(5, 7, 9, 12), (0, 0, 60, 80), (10, 20, 16, 16), (3, 50, 40, 30)]:
        out = image_ops.crop_into_(torch.empty(3, 16, 16), image, box, flip)
        ref = F.resized_crop(image, *box, [16, 16], antialias=True)
        ref = F.hflip(ref) if flip else ref
        torch.testing.assert_close(out, ((ref + 1) / 2).clamp(0, 1), atol=ATOL, rtol=0)


def test_a_reused_workspace_gives_the_views_of_fresh_memory():
    # Scratch left over from a wider blur, a colour image and a hue must not leak into the next op.
    work = image_ops.Workspace()
    x, gray = _rand(3, 32, 32, seed=7), _rand(1, 32, 32, seed=8)
    wide, narrow = image_ops.blur_taps(23, torch.tensor([2.0, 0.4]))
    image_ops.hue_(x.clone(), 0.1, work)
    image_ops.gaussian_blur_into(torch.empty(3, 32, 32), x, wide, work=work)
    for image, taps in [(gray, narrow), (x, narrow), (gray, wide)]:
        fresh = image_ops.gaussian_blur_into(torch.empty(3, 32, 32), image, taps)
        assert torch.equal(image_ops.gaussian_blur_into(torch.empty(3, 32, 32), image, taps, work=work), fresh)
    assert torch.equal(image_ops.hue_(x.clone(), -0.15, work), image_ops.hue_(x.clone(), -0.15))
    assert torch.equal(image_ops.saturation_(x.clone(), 0.3, work), image_ops.saturation_(x.clone(), 0.3))


def test_blur_keeps_float64_images_in_float64():
    # The taps are torchvision's float32 kernel (as for float32 images): ~1e-8 from its float64 one.
    x = _rand(3, 32, 32, seed=9).double()
    taps = image_ops.blur_taps(23, torch.tensor([1.3]))[0]
    out = image_ops.gaussian_blur_into(torch.empty_like(x), x, taps)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.gaussian_blur(x, [23, 23], [1.3, 1.3]), atol=1e-6, rtol=0)
