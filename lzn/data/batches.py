"""Per-step training batches: this rank's images of a step as the dict every objective takes.

`StepBatcher(images, labels, step)` turns this rank's part of the global batch of `step`
into {"images" or, for two-view objectives, "views" (2, b, C, H, W), "labels", "rng"} on
its device: the pixels travel as they come (uint8, ideally from pinned memory, copied
without blocking), become float in [-1, 1] there and are augmented there, batched, with
per-sample parameters of (seed, step, position in the global batch): see lzn.data.augment
and lzn.data.stream. `make_batches` feeds it from an in-memory dataset with the batches a
pure function of (seed, step); a streaming reader (Ray Data, lzn.data.loader) feeds it the
rows it reads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lzn.data.augment import Images, augment_batch, build_augment
from lzn.data.stream import BatchStream, StepRandom
from lzn.errors import UserError


def to_device_float(x: Tensor, device, pixel_max: int) -> Tensor:
    """x on `device` (copied without blocking) as float in [-1, 1]: uint8 in [0, pixel_max]
    maps as lzn.data.reader.to_float does (x 2 / pixel_max - 1); float is taken as in [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.to(device, non_blocking=True).float().mul_(2.0 / pixel_max).sub_(1.0)
    if not x.is_floating_point():
        raise UserError(f"images must be uint8 in [0, pixel_max] or float in [-1, 1], got dtype {x.dtype}")
    return x.to(device, non_blocking=True)


class StepBatcher:
    """One rank's batches: images (uint8 in [0, pixel_max] or float in [-1, 1]) in, an objective's dict out."""

    def __init__(self, *, global_batch: int, seed: int, augment: str, image_size: int, two_view: bool,
                 rank: int = 0, world: int = 1, device="cpu", pixel_max: int = 255):
        if global_batch % world:
            raise UserError(f"global batch size {global_batch} is not divisible by {world} workers")
        if isinstance(pixel_max, bool) or not isinstance(pixel_max, int) or pixel_max < 1:
            raise UserError(f"pixel_max (the value of a white pixel) must be a positive int such as 255 or 16, "
                            f"got {pixel_max!r}")
        self.global_batch, self.seed, self.two_view = global_batch, seed, two_view
        self.rank, self.world, self.device, self.pixel_max = rank, world, torch.device(device), pixel_max
        self.transform = build_augment(augment, image_size)
        self.local_batch = global_batch // world
        self.positions = torch.arange(self.local_batch) + rank * self.local_batch

    def __call__(self, x: Images, labels: Tensor, step: int) -> dict:
        """x: (global_batch / world, C, H, W), or as many images (C, H_i, W_i) of any sizes
        (full resolution, for an augmentation that crops each to image_size), uint8 in
        [0, pixel_max] (pinned host memory makes the copy asynchronous) or float in [-1, 1];
        labels: (global_batch / world,)."""
        if len(x) != self.local_batch:
            raise ValueError(f"rank {self.rank} expects {self.local_batch} images a step, got {len(x)}")
        if isinstance(x, Tensor):
            images = to_device_float(x, self.device, self.pixel_max)
        else:
            images = [to_device_float(img, self.device, self.pixel_max) for img in x]
        out = {"labels": labels.to(self.device, non_blocking=True),
               "rng": StepRandom(self.seed, step, rank=self.rank, world=self.world, device=self.device)}
        kw = dict(seed=self.seed, step=step, positions=self.positions, total=self.global_batch)
        if self.two_view:
            out["views"] = torch.stack([augment_batch(self.transform, images, view=v, **kw) for v in (0, 1)])
        else:
            out["images"] = augment_batch(self.transform, images, **kw)
        return out


def make_batches(images: Tensor, labels: Tensor, *, global_batch: int, seed: int, augment: str,
                 two_view: bool, rank: int = 0, world: int = 1, device="cpu",
                 pixel_max: int = 255) -> Callable[[int], dict]:
    """images: (N, C, H, W) float in [-1, 1], or uint8 in [0, pixel_max]; labels: (N,).
    On a CUDA device this rank's rows are gathered into pinned memory, so the copy overlaps."""
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    stream = BatchStream(len(images), global_batch, seed=seed, rank=rank, world=world)
    batcher = StepBatcher(global_batch=global_batch, seed=seed, augment=augment, image_size=images.shape[-1],
                          two_view=two_view, rank=rank, world=world, device=device, pixel_max=pixel_max)
    pin = batcher.device.type == "cuda" and images.device.type == "cpu"

    def batch(step: int) -> dict:
        idx = stream.local_indices(step)
        if not pin:
            return batcher(images[idx], labels[idx], step)
        rows = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
        return batcher(torch.index_select(images, 0, idx, out=rows), labels[idx], step)

    return batch
