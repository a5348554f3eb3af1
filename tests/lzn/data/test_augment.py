"""The augmentations: the batched SimCLR pipeline against torchvision per sample under the
same parameters, its parameters' distributions against torchvision's, views cropped from
full-resolution images of any size, the same views on 1 or 4 ranks, and the flip as the
per-sample pipeline it replaced."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lzn import seeds
from lzn.data.augment import SimCLRTwoView, augment_batch, blur_kernel, build_augment, crops_any_size
from lzn.data.batches import StepBatcher
from lzn.data.digits import digits_split
from lzn.data.reader import square_pixels, to_float
from lzn.data.transforms import crop_boxes

# float32 carries ~7 digits; one pixel of a view goes through ~50 float operations (a
# resampling sum of ~10 taps, four jitter blends, a hue round trip, 2 x 23 blur taps), each
# rounding differently here and in torchvision (other order of sums, weights divided vs
# multiplied): ~1e-6 apart. 2e-5 leaves 10x of margin and is ~1/500 of a 1/255 grey level.
PIPELINE_ATOL = 2e-5


def reference_view(image01: torch.Tensor, p, b: int, size: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional applied to one [0, 1] image with sample b's
    parameters, in the order of the reference's Compose; returns [-1, 1]."""
    top, left, h, w = p.boxes[b].tolist()
    y = F.resized_crop(image01, top, left, h, w, [size, size], antialias=True)
    if p.flip[b]:
        y = F.hflip(y)
    if p.jitter[b]:
        ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        for op in p.order[b].tolist():
            y = ops[op](y, float(p.factors[b, op]))
    if p.gray[b]:
        y = F.rgb_to_grayscale(y, num_output_channels=y.shape[0])
    k = blur_kernel(size)
    s = float(p.sigma[b])
    return F.gaussian_blur(y, [k, k], [s, s]) * 2 - 1


def _images(sizes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(channels, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("channels", [3, 1])
def test_simclr_matches_torchvision_per_sample_under_the_same_parameters(channels):
    # Sizes that make the 32 px crops upscale (small images), downscale (large) or keep size.
    sizes = [(300, 400), (24, 18), (32, 32), (500, 260), (120, 90), (40, 200), (64, 64), (300, 400)]
    images = _images(sizes, channels)
    aug = SimCLRTwoView(32)
    positions = torch.arange(len(sizes)) + 5
    p = aug.params(torch.tensor(sizes), seed=4, step=9, view=1, positions=positions, total=20)
    assert p.jitter.any() and p.flip.any() and not p.flip.all()
    out = aug.apply([x * 2 - 1 for x in images], p)
    assert out.shape == (len(sizes), channels, 32, 32) and out.dtype == torch.float32
    for b, image in enumerate(images):
        torch.testing.assert_close(out[b], reference_view(image, p, b, 32), atol=PIPELINE_ATOL, rtol=0)
    # ... and __call__ draws exactly these parameters from (seed, step, view, positions).
    again = aug([x * 2 - 1 for x in images], seed=4, step=9, view=1, positions=positions, total=20)
    assert torch.equal(again, out)


def test_simclr_at_224_with_grayscale_and_every_jitter_order():
    # A batch at the paper's size where every branch runs: gray, hue in each slot.
    sizes = [(300, 400)] * 24
    images = _images(sizes, seed=1)
    aug = SimCLRTwoView(224)
    p = aug.params(torch.tensor(sizes), seed=0, step=3, view=0, positions=torch.arange(24), total=24)
    assert p.gray.any() and (~p.jitter).any()
    hue_slots = {int((row == 3).nonzero()) for row, j in zip(p.order, p.jitter) if j}
    assert len(hue_slots) >= 3
    out = aug.apply([x * 2 - 1 for x in images], p)
    for b in range(0, 24, 3):
        torch.testing.assert_close(out[b], reference_view(images[b], p, b, 224), atol=PIPELINE_ATOL, rtol=0)


def test_blur_is_the_references_always_applied_kernel_23_at_224():
    # The reference (lzn/data/imagenet_aug.py:34): T.GaussianBlur(kernel_size=23) in the
    # Compose, not inside a RandomApply, with torchvision's default sigma (0.1, 2.0).
    assert blur_kernel(224) == 23 == int(0.1 * 224) + 1
    assert all(blur_kernel(s) % 2 == 1 for s in range(8, 600))  # a Gaussian kernel needs a centre
    aug = build_augment("simclr", 224)
    assert isinstance(aug, SimCLRTwoView) and aug.kernel == 23 and aug.SIGMA == (0.1, 2.0)
    # Every sample is blurred, whatever its other draws: against the same views without the
    # blur, a checkerboard's views all lose contrast (sigma >= 0.5 spreads a pixel well
    # beyond its neighbours; below that the Gaussian is nearly a delta, as in torchvision).
    board = ((torch.arange(300)[:, None] // 2 + torch.arange(400)[None, :] // 2) % 2).float().expand(3, -1, -1)
    n = 32
    p = aug.params(torch.tensor([[300, 400]]).expand(n, 2), seed=0, step=0, view=0, positions=torch.arange(n),
                   total=n)
    sharp = SimCLRTwoView(224)
    sharp.kernel = 1
    views, unblurred = aug.apply([board * 2 - 1] * n, p), sharp.apply([board * 2 - 1] * n, p)
    wide = p.sigma >= 0.5
    assert wide.sum() >= n // 2
    assert (views.std(dim=(1, 2, 3)) < unblurred.std(dim=(1, 2, 3)) * 0.9)[wide & (unblurred.std(dim=(1, 2, 3)) > 0.05)].all()


def test_parameters_follow_torchvision_distributions():
    n, (height, width) = 4000, (300, 400)
    aug = SimCLRTwoView(224)
    p = aug.params(torch.tensor([[height, width]]).expand(n, 2), seed=1, step=0, view=0,
                   positions=torch.arange(n), total=n)
    top, left, h, w = p.boxes.double().unbind(1)
    share, log_ratio = h * w / (height * width), torch.log(w / h)
    # Rounding h and w to pixels moves a box's share and ratio by ~1 px of ~50 at the least.
    assert share.min() >= 0.08 * 0.95 and share.max() <= 1
    assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # torchvision's own draws for the same image: means agree within ~5 standard errors.
    rrc = v2.RandomResizedCrop(224)
    torch.manual_seed(0)
    ref = [rrc.make_params([torch.zeros(3, height, width)]) for _ in range(n)]
    ref_share = torch.tensor([r["height"] * r["width"] / (height * width) for r in ref], dtype=torch.float64)
    ref_ratio = torch.tensor([math.log(r["width"] / r["height"]) for r in ref], dtype=torch.float64)
    assert abs(share.mean() - ref_share.mean()) < 0.03 and abs(share.std() - ref_share.std()) < 0.03
    assert abs(log_ratio.mean() - ref_ratio.mean()) < 0.03
    # The offsets are uniform over the positions that fit: centred on average.
    assert abs(((top + h / 2) / height).mean() - 0.5) < 0.02 and abs(((left + w / 2) / width).mean() - 0.5) < 0.02
    # Bernoulli frequencies: 5 standard errors at n = 4000 are < 0.04.
    assert abs(p.flip.double().mean() - 0.5) < 0.04
    assert abs(p.jitter.double().mean() - 0.8) < 0.04
    assert abs(p.gray.double().mean() - 0.2) < 0.04
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))  # a permutation each
    first = torch.bincount(p.order[:, 0], minlength=4).double() / n
    assert (first - 0.25).abs().max() < 0.04  # each op first a quarter of the time
    lo, hi = torch.tensor([0.2, 0.2, 0.2, -0.2]), torch.tensor([1.8, 1.8, 1.8, 0.2])
    assert (p.factors >= lo).all() and (p.factors <= hi).all()
    assert ((p.factors.double().mean(0) - (lo + hi).double() / 2).abs() < 0.05).all()
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0 and abs(p.sigma.double().mean() - 1.05) < 0.05


def test_crop_falls_back_to_torchvisions_centre_crop_when_no_try_fits():
    # A 10 x 400 strip: every try needs a box >= sqrt(0.08 * 4000 * 3/4) ~ 15 px high, so
    # torchvision takes the whole height and the widest allowed ratio, centred.
    u = torch.rand(5, 10, generator=torch.Generator().manual_seed(0))
    strip = crop_boxes(torch.full((5,), 10), torch.full((5,), 400), u, u.flip(1), u[:, 0], u[:, 1])
    w = round(10 * 4 / 3)
    assert strip.tolist() == [[0, (400 - w) // 2, 10, w]] * 5
    tall = crop_boxes(torch.full((1,), 400), torch.full((1,), 10), u[:1], u[:1], u[:1, 0], u[:1, 1])
    h = round(10 / (3 / 4))
    assert tall.tolist() == [[(400 - h) // 2, 0, h, 10]]


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
    assert edge(views).sum() >= 4  # crops near the left edge (40 of 256 columns)


@pytest.mark.parametrize("world", [2, 4])
def test_mixed_sizes_are_cropped_per_sample_deterministically_and_rank_invariantly(world):
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
    assert torch.equal(torch.cat([views(r, world) for r in range(world)], dim=1), one)
    assert (one[0] - one[1]).abs().mean() > 0.05  # two different views of each image


def test_a_stacked_batch_and_its_list_give_the_same_views():
    x = torch.rand(6, 3, 50, 70, generator=torch.Generator().manual_seed(2)) * 2 - 1
    aug = build_augment("simclr", 24)
    kw = dict(seed=3, step=1, positions=torch.arange(6), total=6)
    torch.testing.assert_close(augment_batch(aug, x, **kw), augment_batch(aug, list(x), **kw), atol=0, rtol=0)


def test_flip_flips_the_samples_the_per_sample_pipeline_flipped():
    # The replaced pipeline: v2.RandomHorizontalFlip on each image under
    # torch.manual_seed(seeds.augmentation(seed, step, position, view)).
    x = torch.rand(12, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    positions = torch.arange(12) + 30
    out = augment_batch(build_augment("flip", 5), x, seed=2, step=11, positions=positions, total=64, view=1)
    flip = v2.RandomHorizontalFlip()
    with torch.random.fork_rng(devices=[]):
        for img, pos, got in zip(x, positions.tolist(), out):
            torch.manual_seed(seeds.augmentation(2, 11, pos, 1))
            assert torch.equal(got, flip(img))
    assert 0 < sum(torch.equal(o, i.flip(-1)) for o, i in zip(out, x)) < 12


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


def test_the_accelerator_route_gives_the_cpu_routes_views(monkeypatch):
    # On a GPU the whole batch goes at once and the crops are one batched GEMM; forced here
    # on the CPU, the views equal those of the CPU route (image by image, lzn.data.image_ops).
    import functools

    import lzn.data.augment as augment
    from lzn.data.transforms import resized_crops

    x = torch.rand(12, 3, 60, 90, generator=torch.Generator().manual_seed(4)) * 2 - 1
    kw = dict(seed=1, step=2, view=0, positions=torch.arange(12), total=12)
    aug = SimCLRTwoView(32)
    cpu = aug(x, **kw)
    monkeypatch.setattr(SimCLRTwoView, "PER_IMAGE_ON_CPU", False)
    monkeypatch.setattr(augment, "resized_crops", functools.partial(resized_crops, batched=True))
    torch.testing.assert_close(aug(x, **kw), cpu, atol=PIPELINE_ATOL, rtol=0)
