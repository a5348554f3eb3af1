"""Per-step training batches: this rank's images of a step as the dict every objective takes.

`StepBatcher(images, labels, step)` turns this rank's part of the global batch of `step`
into {"images" or, for two-view objectives, "views" (2, b, C, H, W), "labels", "rng"},
augmented per sample under seeds of (seed, step, position in the global batch): see
lzn.data.stream. `make_batches` feeds it from an in-memory dataset with the batches a pure
function of (seed, step); a streaming reader (Ray Data) feeds it the rows it streams.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lzn.data.augment import Images, augment_batch, build_augment
from lzn.data.stream import BatchStream, StepRandom
from lzn.errors import UserError


class StepBatcher:
    def __init__(self, *, global_batch: int, seed: int, augment: str, image_size: int, two_view: bool,
                 rank: int = 0, world: int = 1, device="cpu"):
        if global_batch % world:
            raise UserError(f"global batch size {global_batch} is not divisible by {world} workers")
        self.global_batch, self.seed, self.two_view = global_batch, seed, two_view
        self.rank, self.world, self.device = rank, world, device
        self.transform = build_augment(augment, image_size)
        self.local_batch = global_batch // world
        self.positions = torch.arange(self.local_batch) + rank * self.local_batch

    def __call__(self, x: Images, labels: Tensor, step: int) -> dict:
        """x: (global_batch / world, C, H, W) in [-1, 1], or as many images (C, H_i, W_i) of
        any sizes (full resolution, for an augmentation that crops each to image_size before
        the batch is stacked); labels: (global_batch / world,)."""
        if len(x) != self.local_batch:
            raise ValueError(f"rank {self.rank} expects {self.local_batch} images a step, got {len(x)}")
        out = {"labels": labels.to(self.device),
               "rng": StepRandom(self.seed, step, rank=self.rank, world=self.world, device=self.device)}
        kw = dict(seed=self.seed, step=step, positions=self.positions, total=self.global_batch)
        if self.two_view:
            views = [augment_batch(self.transform, x, view=v, **kw) for v in (0, 1)]
            out["views"] = torch.stack(views).to(self.device)
        else:
            out["images"] = augment_batch(self.transform, x, **kw).to(self.device)
        return out


def make_batches(images: Tensor, labels: Tensor, *, global_batch: int, seed: int, augment: str,
                 two_view: bool, rank: int = 0, world: int = 1, device="cpu") -> Callable[[int], dict]:
    """images: (N, C, H, W) in [-1, 1]; labels: (N,)."""
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    stream = BatchStream(len(images), global_batch, seed=seed, rank=rank, world=world)
    batcher = StepBatcher(global_batch=global_batch, seed=seed, augment=augment, image_size=images.shape[-1],
                          two_view=two_view, rank=rank, world=world, device=device)

    def batch(step: int) -> dict:
        idx = stream.local_indices(step)
        return batcher(images[idx], labels[idx], step)

    return batch
