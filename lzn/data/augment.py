"""Augmentations (torchvision transforms v2), deterministic per (seed, step, sample).

Each sample is transformed under its own seed derived from the run seed, the step and
its position in the global batch, so a sample gets the same views whether 1 or W workers
train and after a resume. Pipelines by name:
- "none": identity; "flip": random horizontal flip (generation, as in the paper);
- "simclr": the SimCLR-v2 two-view pipeline of the paper, as the reference
  (lzn/data/imagenet_aug.py:28-38): RandomResizedCrop of the full-resolution image, flip,
  ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur always (p = 1,
  kernel int(0.1 size) made odd: 23 at 224, sigma uniform in [0.1, 2]). It takes images of
  any size and returns size x size, so a batch of mixed sizes is cropped per sample before
  it is stacked (`crops_any_size`);
- "simclr_digits": its 8x8 single-channel variant: no flip (a mirrored 2 is not a 2),
  random zoom (crop), rotation and shift as one affine warp, contrast/brightness jitter.
  Vectorised over the batch: per-sample torchvision transforms on 8x8 images spent
  ~1 s a step in Python overhead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import math

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from lzn import seeds
from lzn.errors import UserError


def blur_kernel(size: int) -> int:
    """The reference's blur kernel for `size` px crops: int(0.1 size) + 1 at 224 (= 23), in
    general int(0.1 size) rounded up to odd (a Gaussian kernel needs a centre)."""
    return int(0.1 * size) | 1


def _simclr(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.GaussianBlur(kernel_size=blur_kernel(size), sigma=(0.1, 2.0)),  # always, as the reference
    ])


class BatchAugment:
    """A batched augmentation: random parameters per sample, drawn for the global batch
    from (seed, step, view) and picked by the samples' positions in it."""

    def __call__(self, images: Tensor, generator: torch.Generator, positions: Tensor, total: int) -> Tensor:
        raise NotImplementedError


class DigitsTwoView(BatchAugment):
    """Zoom in [1, 1/0.6] (a crop of 60-100% of the side), rotation within +-15 degrees,
    shift within +-1 pixel, then with p = 0.8 brightness +-0.4 and contrast x[0.6, 1.4]."""

    def __call__(self, images, generator, positions, total):
        def draw(*shape):
            return torch.rand(total, *shape, generator=generator)[positions].to(images.device)

        zoom = 0.6 + 0.4 * draw()  # sampling grid scale < 1 zooms in
        angle = (draw() * 2 - 1) * math.radians(15)
        shift = (draw(2) * 2 - 1) * (2.0 / images.shape[-1])
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        # Background is -1 (white paper in [-1, 1] digits is -1): warp (x + 1), pad with 0.
        out = nn.functional.grid_sample(images + 1, grid, padding_mode="zeros", align_corners=False) - 1
        jitter = (draw() < 0.8).to(images.dtype).view(-1, 1, 1, 1)
        bright = ((draw() * 2 - 1) * 0.4).view(-1, 1, 1, 1)
        contrast = (0.6 + 0.8 * draw()).view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        jittered = (out - mean) * contrast + mean + bright
        return (jitter * jittered + (1 - jitter) * out).clamp(-1, 1)


def _simclr_digits(size: int) -> BatchAugment:
    return DigitsTwoView()


PIPELINES: dict[str, Callable[[int], v2.Transform | BatchAugment | None]] = {
    "none": lambda size: None,
    "flip": lambda size: v2.RandomHorizontalFlip(),
    "simclr": _simclr,
    "simclr_digits": _simclr_digits,
}


# Pipelines whose output is image_size x image_size whatever the input's size: they get the
# images at full resolution (the stream does not square them first) and crop per sample.
CROPS_ANY_SIZE = frozenset({"simclr"})


def crops_any_size(name: str) -> bool:
    """Whether pipeline `name` turns an image of any size into image_size x image_size."""
    if name not in PIPELINES:
        raise UserError(f"unknown augmentation {name!r}; expected one of {sorted(PIPELINES)}")
    return name in CROPS_ANY_SIZE


def build_augment(name: str, image_size: int) -> v2.Transform | BatchAugment | None:
    if name not in PIPELINES:
        raise UserError(f"unknown augmentation {name!r}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name](image_size)


Images = Tensor | Sequence[Tensor]  # (B, C, H, W), or B images (C, H_i, W_i) of any sizes


def stack_images(images: Images, why: str) -> Tensor:
    """(B, C, H, W) of a batch whose images share one size; a clear error naming the sizes otherwise."""
    if isinstance(images, Tensor):
        return images
    sizes = sorted({tuple(x.shape) for x in images})
    if len(sizes) > 1:
        raise ValueError(f"a batch of images of sizes {sizes[:4]}{' ...' if len(sizes) > 4 else ''} cannot be "
                         f"stacked {why}; mixed sizes need a cropping augmentation ({sorted(CROPS_ANY_SIZE)}) "
                         "or images squared by the reader")
    return torch.stack(list(images))


def augment_batch(transform: v2.Transform | BatchAugment | None, images: Images, *, seed: int, step: int,
                  positions: Tensor, total: int, view: int = 0) -> Tensor:
    """Apply `transform` to each image in [-1, 1] under its own seed; returns (B, C, S, S).

    images: (B, C, H, W), or a list of B images (C, H_i, W_i) at full resolution, which a
    per-sample transform that crops (`crops_any_size`) maps to one size before they are
    stacked. positions: (B,) positions of the images in the global batch of `total` images.
    Per-sample transforms work on [0, 1] because colour transforms assume it.
    """
    if transform is None:
        return stack_images(images, "without augmentation")
    if isinstance(transform, BatchAugment):
        g = torch.Generator().manual_seed(seeds.batch_augmentation(seed, step, view))
        return transform(stack_images(images, f"for {type(transform).__name__}"), g, positions, total)
    out = []
    with torch.random.fork_rng(devices=[]):
        for img, pos in zip(images, positions.tolist()):
            torch.manual_seed(seeds.augmentation(seed, step, pos, view))
            out.append(transform((img + 1) / 2).clamp(0, 1) * 2 - 1)
    return stack_images(out, f"after {type(transform).__name__}")
