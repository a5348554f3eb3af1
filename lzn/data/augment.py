"""Augmentations (torchvision transforms v2), deterministic per (seed, step, sample).

Each sample is transformed under its own seed derived from the run seed, the step and
its position in the global batch, so a sample gets the same views whether 1 or W workers
train and after a resume. Pipelines by name:
- "none": identity; "flip": random horizontal flip (generation, as in the paper);
- "simclr": the SimCLR-v2 two-view pipeline of the paper (RandomResizedCrop, flip,
  ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur);
- "simclr_digits": its 8x8 single-channel variant: no flip (a mirrored 2 is not a 2),
  crops, small rotations and shifts, contrast/brightness jitter, blur.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2


def _simclr(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=(size // 10) * 2 + 1, sigma=(0.1, 2.0))], p=0.5),
    ])


def _simclr_digits(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomAffine(degrees=15, translate=(0.125, 0.125)),
        v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=0.3),
    ])


PIPELINES: dict[str, Callable[[int], v2.Transform | None]] = {
    "none": lambda size: None,
    "flip": lambda size: v2.RandomHorizontalFlip(),
    "simclr": _simclr,
    "simclr_digits": _simclr_digits,
}


def build_augment(name: str, image_size: int) -> v2.Transform | None:
    if name not in PIPELINES:
        raise ValueError(f"unknown augmentation {name!r}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name](image_size)


def _sample_seed(seed: int, step: int, position: int, view: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + position) * 4 + view


def augment_batch(transform: v2.Transform | None, images: Tensor, *, seed: int, step: int,
                  positions: Tensor, view: int = 0) -> Tensor:
    """Apply `transform` to each image (B, C, H, W) in [-1, 1] under its own seed.

    positions: (B,) positions of the images in the global batch. Works on [0, 1] internally
    because colour transforms assume it.
    """
    if transform is None:
        return images
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for i, (img, pos) in enumerate(zip(images, positions.tolist())):
            torch.manual_seed(_sample_seed(seed, step, pos, view))
            out[i] = transform((img + 1) / 2).clamp(0, 1) * 2 - 1
    return out
