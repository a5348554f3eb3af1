"""Collectives for latent parallelism, injected into `lzn.zoning` as `gather=`.

Every worker encodes its shard of the batch, all-gathers the anchors *with gradients*,
and computes its own latents against the anchors of the global batch. In the backward
pass the gradient each worker computes for a gathered anchor is summed onto the worker
that owns it, so with DDP's gradient averaging the update equals the single-process
update on the whole batch. torch.distributed's autograd all-gather does exactly that
(reduce-scatter on NCCL, all-to-all on gloo); this module checks shapes and gives the
zoning functions a plain `Tensor -> Tensor` callable. Rank and world size come from the
process group that torchrun, Ray Train or submitit set up.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather as _autograd_all_gather


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(t: Tensor, group=None) -> Tensor:
    """Concatenate `t` (n, ...) from every rank along dim 0, in rank order: (world * n, ...).

    Gradients w.r.t. the result flow back to the rank that owns each slice (summed over
    ranks). Every rank must pass the same shape; a mismatch raises instead of hanging or
    silently misaligning targets. Without an initialised process group it is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    if dist.get_world_size(group) == 1:
        return t
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            "all_gather_with_grad needs the same shape on every rank (use drop_last=True "
            f"in the sampler); got {[tuple(s.tolist()) for s in shapes]}"
        )
    return torch.cat(_autograd_all_gather(t, group=group), dim=0)


def make_gather(group=None) -> Callable[[Tensor], Tensor]:
    """A `gather=` callable for `lzn.zoning`, bound to a process group."""
    return lambda t: all_gather_with_grad(t, group)


def global_indices(local_batch: int, device=None) -> Tensor:
    """Indices (local_batch,) of this rank's samples inside the gathered global batch."""
    return torch.arange(local_batch, device=device) + rank() * local_batch
