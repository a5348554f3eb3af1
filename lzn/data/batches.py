"""Per-step training batches from an in-memory dataset (the digits, or decoded shards).

`make_batches(...)(step)` returns this rank's part of the global batch of `step` as the
dict every objective takes: "images" or, for two-view objectives, "views" (2, b, C, H, W),
plus "labels" and "rng". Everything is a function of (seed, step): see lzn.data.stream.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lzn.data.augment import augment_batch, build_augment
from lzn.data.stream import BatchStream, StepRandom


def make_batches(images: Tensor, labels: Tensor, *, global_batch: int, seed: int, augment: str,
                 two_view: bool, rank: int = 0, world: int = 1, device="cpu") -> Callable[[int], dict]:
    """images: (N, C, H, W) in [-1, 1]; labels: (N,)."""
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    stream = BatchStream(len(images), global_batch, seed=seed, rank=rank, world=world)
    transform = build_augment(augment, images.shape[-1])
    part = global_batch // world
    positions = torch.arange(part) + rank * part

    def batch(step: int) -> dict:
        idx = stream.local_indices(step)
        x = images[idx]
        out = {"labels": labels[idx].to(device), "rng": StepRandom(seed, step, rank=rank, world=world, device=device)}
        if two_view:
            views = [augment_batch(transform, x, seed=seed, step=step, positions=positions, total=global_batch,
                                   view=v) for v in (0, 1)]
            out["views"] = torch.stack(views).to(device)
        else:
            out["images"] = augment_batch(transform, x, seed=seed, step=step, positions=positions,
                                          total=global_batch).to(device)
        return out

    return batch
