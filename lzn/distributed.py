"""Collectives for latent parallelism, injected into `lzn.zoning` as `gather=`.

Every worker encodes its shard of the batch, all-gathers the anchors *with gradients*,
and computes its own latents against the anchors of the global batch. In the backward
pass the gradient each worker computes for a gathered anchor is summed onto the worker
that owns it, so with DDP's gradient averaging the update equals the single-process
update on the whole batch. torch.distributed's autograd all-gather does exactly that
(reduce-scatter on NCCL, all-to-all on gloo); this module checks shapes and gives the
zoning functions a plain `Tensor -> Tensor` callable. Rank and world size come from the
process group that torchrun, Ray Train or submitit set up.

`settle` is the barrier after a step every rank takes (a stage of the DAG, a share of the
evaluation): each rank's outcome is all-gathered, so one rank's failure fails the others with
its message instead of leaving them waiting at the next collective.

`GradientBuckets` is the trainer's gradient averaging: DDP's bucketed all-reduce, launched
from gradient hooks while backward still runs, for objectives that train through
`loss(batch)` rather than `forward` and whose set of trainable parameters changes
(`train.freeze_after`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather as _autograd_all_gather

from lzn.errors import UserError


def is_distributed(group=None) -> bool:
    """A process group is initialised and `group` (None: the default one) has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class OtherRankFailed(RuntimeError):
    """What a rank raises when another rank failed: the story (traceback) is that rank's."""


def settle(what: str, error: BaseException | None, payload=None, *, group=None, raise_here: bool = True) -> list:
    """Every rank of `group` (None: the default group), at the same point after `what`, with its
    own `error` (None: it went well) and `payload` (any picklable value): returns every rank's
    payload in rank order. Where `raise_here`, raises when `what` failed on any rank: this
    rank's own error as it is, another's as a UserError if it was one, else OtherRankFailed,
    naming the rank and its message. Without a process group: this process alone."""
    said = None if error is None else (isinstance(error, UserError), f"{type(error).__name__}: {error}")
    gathered = [(payload, said)]
    if is_distributed(group):  # the barrier
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (payload, said), group=group)
    if raise_here:
        if error is not None:
            raise error
        for r, (_, failed) in enumerate(gathered):
            if failed is not None:
                user, text = failed
                raise (UserError if user else OtherRankFailed)(f"{what} failed on rank {r}: {text}")
    return [p for p, _ in gathered]


def all_gather_with_grad(t: Tensor, group=None) -> Tensor:
    """Concatenate `t` (n, ...) from every rank along dim 0, in rank order: (world * n, ...).

    Gradients w.r.t. the result flow back to the rank that owns each slice (summed over
    ranks). Every rank must pass the same shape; a mismatch raises instead of hanging or
    silently misaligning targets. The check (a collective and a host sync) runs on the
    first call with each shape only, so every rank must meet a new shape at the same call,
    as a fixed local batch does. Without an initialised process group it is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size(group)
    if world == 1:
        return t
    key = (id(group if group is not None else dist.group.WORLD), world, tuple(t.shape))
    if key not in _CHECKED_SHAPES:
        _check_same_shape(t, world, group)
        _CHECKED_SHAPES.add(key)
    return torch.cat(_autograd_all_gather(t, group=group), dim=0)


_CHECKED_SHAPES: set[tuple] = set()  # (group, world, shape) that every rank has shown


def _check_same_shape(t: Tensor, world: int, group) -> None:
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):  # host sync: once per shape
        raise ValueError(
            "all_gather_with_grad needs the same shape on every rank (use drop_last=True "
            f"in the sampler); got {[tuple(s.tolist()) for s in shapes]}"
        )


def make_gather(group=None) -> Callable[[Tensor], Tensor]:
    """A `gather=` callable for `lzn.zoning`, bound to a process group."""
    return lambda t: all_gather_with_grad(t, group)


def global_indices(local_batch: int, device=None) -> Tensor:
    """Indices (local_batch,) of this rank's samples inside the gathered global batch."""
    return torch.arange(local_batch, device=device) + rank() * local_batch


BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class _Bucket:
    """One flat gradient buffer for parameters of one device and dtype; `extra` spare
    elements at its end (the last bucket's: the trainer's flag)."""

    def __init__(self, params: list[nn.Parameter], extra: int = 0, *, dtype=None, device=None):
        self.params = params
        if params:
            dtype, device = params[0].dtype, params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in params) + extra, dtype=dtype or torch.float32,
                                  device=device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(_grad_view(self.buffer, offset, p))
            offset += p.numel()
        self.pending = len(params)
        self.work = None


def _dense(p: Tensor) -> bool:
    """Whether p's strides are a permutation of a contiguous layout's (e.g. channels_last)."""
    expected = 1
    for size, stride in sorted(zip(p.shape, p.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _grad_view(buffer: Tensor, offset: int, p: Tensor) -> Tensor:
    """p's slot in a bucket, with p's strides where p is dense: fused optimizers want a
    gradient laid out as its parameter (a channels_last weight gets a channels_last grad)."""
    if _dense(p):
        return buffer.as_strided(p.shape, p.stride(), buffer.storage_offset() + offset)
    return buffer[offset : offset + p.numel()].view(p.shape)


def _buckets(params: Sequence[nn.Parameter], bucket_bytes: int, device) -> list[_Bucket]:
    """Buckets of `params` in reverse order, one device and dtype each, closed at
    `bucket_bytes`; the last one carries one spare element."""
    full: list[list[nn.Parameter]] = []
    open_: dict[tuple, tuple[list[nn.Parameter], list[int]]] = {}
    for p in reversed(params):
        members, size = open_.setdefault((p.device, p.dtype), ([], [0]))
        members.append(p)
        size[0] += p.numel() * p.element_size()
        if size[0] >= bucket_bytes:
            full.append(open_.pop((p.device, p.dtype))[0])
    full.extend(members for members, _ in open_.values())
    if not full:
        return [_Bucket([], 1, device=device)]
    return [_Bucket(members, int(i == len(full) - 1)) for i, members in enumerate(full)]


def _reachable_leaves(t: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) whose gradient accumulators t's graph reaches."""
    leaves: set[int] = set()
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(f for f, _ in node.next_functions)
    return leaves


class GradientBuckets:
    """Average the gradients of `params` over the ranks of `group` while backward runs.

    The parameters are split, in reverse order (backward reaches the last layers first),
    into buckets of about `bucket_bytes`; each parameter's .grad is a view into its
    bucket's flat buffer, so autograd accumulates straight into it. A gradient hook marks
    a parameter ready; a bucket whose parameters are all ready starts an asynchronous
    all-reduce, in bucket order on every rank, overlapping the rest of backward. A
    parameter that gets no gradient on a step keeps the zeros `zero_grad` left, so it
    counts as a zero gradient on that rank. Its bucket, and every later one, would wait for
    `finish`: once a step has seen such a parameter (`find_unused` turns on), `start` walks
    the loss's autograd graph (about 1 ms per 500 nodes) and marks the parameters it cannot
    reach ready before backward, as DDP's find_unused_parameters does.

    One step: `zero_grad()`, `start(flag, loss)`, backward, `finish()`. `flag` (0-dim, e.g.
    "this rank's loss is not finite") rides in the last bucket's spare element, so every
    rank learns whether any rank raised it without a collective of its own. Build a new
    instance when the set of trainable parameters changes and `close()` the old one (it
    removes the hooks). Outside start/finish the hooks do nothing: another backward pass
    (an evaluation's, a test's) starts no collective.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, group=None, device=None,
                 bucket_bytes: int | None = None, find_unused: bool = False):
        self.group, self.world = group, dist.get_world_size(group)
        self.find_unused = find_unused
        self.params = list(params)
        self.buckets = _buckets(self.params, bucket_bytes or BUCKET_BYTES, device)
        self._flag = self.buckets[-1].buffer[-1:]
        self._where = {p: (b, view) for b in self.buckets for p, view in zip(b.params, b.views)}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self._next = 0  # the next bucket to launch: every rank launches in bucket order
        self._armed = False

    def zero_grad(self) -> None:
        """Zero the buffers and point every parameter's .grad at its view."""
        for b in self.buckets:
            b.buffer.zero_()
            for p, view in zip(b.params, b.views):
                p.grad = view

    def start(self, flag: Tensor, loss: Tensor | None = None) -> None:
        """Arm the hooks for the backward pass of `loss`; flag: this rank's 0-dim flag."""
        self._flag.copy_(flag.reshape(1))
        for b in self.buckets:
            b.pending, b.work = len(b.params), None
        self._next, self._armed = 0, True
        if self.find_unused and loss is not None:
            reached = _reachable_leaves(loss)
            for p in self.params:
                if id(p) not in reached:  # no gradient can come: ready now
                    self._where[p][0].pending -= 1
            self._launch_ready()

    def _ready(self, p: Tensor) -> None:
        if not self._armed:
            return
        bucket, view = self._where[p]
        if p.grad is not view:  # autograd put a fresh tensor there (.grad was None): move it in
            view.copy_(p.grad)
            p.grad = view
        bucket.pending -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending <= 0:
            b = self.buckets[self._next]
            b.work = dist.all_reduce(b.buffer, group=self.group, async_op=True)
            self._next += 1

    def finish(self) -> Tensor:
        """Reduce the buckets backward left (parameters without a gradient), wait for all
        and divide by the world size. Returns the flags' mean over ranks (> 0 when any rank
        raised its flag) as a 1-element tensor on the device; no host sync."""
        for b in self.buckets:
            self.find_unused |= b.pending > 0
            b.pending = 0
        self._launch_ready()
        for b in self.buckets:
            b.work.wait()  # NCCL: the current stream waits, the host does not
            b.buffer.div_(self.world)
            for p, view in zip(b.params, b.views):
                p.grad = view  # also where a caller reset it: a missing gradient averages as zeros
        self._armed = False
        return self._flag

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._armed = [], False
