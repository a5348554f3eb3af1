"""The evaluation on every rank of a torch.distributed process group: the end of a multi-rank
training run (torchrun, Slurm DDP, Ray Train) and a sweep's metric at each checkpoint, so no
GPU of the allocation idles while one of them samples.

Rank 0 plans the units (`core.plan`) and broadcasts those without a part; rank r computes
units r, r + W, r + 2W, ... of that list (`assign`) into one `PartStore`, in a folder every
rank sees (shared storage across nodes). One all-gather is the barrier: it carries which
units each rank computed and any rank's failure. Rank 0 then merges the parts in unit order
and trains the linear probe (`core.evaluate`): the units are pure functions of their index,
so the numbers are those of one process. The other ranks return None after the barrier.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lzn.distributed import settle
from lzn.eval_data import EvalData
from lzn.evaluate.core import Evaluator, PartStore, Unit, evaluate, execute_here, select_metrics
from lzn.inference import LZNModel

Record = Callable[[dict[str, int]], None]  # rank 0: {unit name: the rank that computed its part}


def assign(units: list[Unit], world: int) -> list[list[Unit]]:
    """The units each of `world` ranks computes: dealt in turn in plan order, so every rank
    gets a share of every kind (the costly sample units as well as the cheap reference rows),
    counts differ by at most one, and every rank knows every share without a message."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    return [units[r::world] for r in range(world)]


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _same_weights(module: nn.Module, src: int, group) -> None:
    """Rank 0's weights on every rank: the model evaluated is the one rank 0 checkpoints, bit
    for bit, whatever rounding may separate the ranks' copies."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


class _Share:
    """This rank's part in one evaluation over the group."""

    def __init__(self, run_here: Callable[[list[Unit]], None], rank: int, world: int, group):
        self.run_here, self.rank, self.world, self.group = run_here, rank, world, group
        self.src = dist.get_global_rank(group, 0) if group is not None and world > 1 else 0

    def lead(self, units: list[Unit]) -> dict[str, int]:
        """Rank 0: hand `units` to every rank, compute its share, wait for the others."""
        if self.world > 1:
            dist.broadcast_object_list([units], src=self.src, group=self.group)
        return self._compute(units)

    def release(self) -> None:
        """Rank 0, with nothing to hand out (every part exists, or planning failed)."""
        if self.world > 1:
            dist.broadcast_object_list([None], src=self.src, group=self.group)

    def follow(self) -> None:
        """Any other rank: compute the share of what rank 0 hands out, if anything."""
        box = [None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        if box[0] is not None:
            self._compute(box[0])

    def _compute(self, units: list[Unit]) -> dict[str, int]:
        mine, error = assign(units, self.world)[self.rank], None
        try:
            self.run_here(mine)
        except Exception as err:  # noqa: BLE001 - every rank must reach the barrier; rank 0 raises it
            error = err
        gathered = settle("the evaluation", error, [u.name for u in mine], group=self.group,
                          raise_here=self.rank == 0)  # the barrier; rank 0 raises any rank's failure
        if self.rank != 0:
            return {}
        return {name: r for r, names in enumerate(gathered) for name in names}


def evaluate_on_ranks(cfg, model: LZNModel, data: EvalData, *, cache_dir: str | Path, parts_dir: str | Path,
                      chosen: list[str] | None = None, progress: bool | Callable = True,
                      record: Record | None = None, group=None) -> dict[str, float | str] | None:
    """The evaluation of `model` sharded over every rank of `group` (None: the default group;
    no process group: this process alone, as `evaluate_here`). A collective: every rank calls
    it at the same point, with the same settings, its own copy of the model (rank 0's weights
    are broadcast to the others first) and data, and the same `parts_dir`, which every rank
    must see. Parts already there are reused, as by `evaluate_here`.

    Rank 0 returns the metrics (what `evaluate_here` returns for the same units) and raises
    when a unit failed on any rank (a UserError stays one); the others return None.
    progress: rank 0's bar over its share (the other ranks draw none). record: called on rank
    0, once the parts are all written, with {unit name: rank} of the units computed now.
    """
    rank, world = _rank_world(group)
    evaluator, store = Evaluator(cfg, model, data, cache_dir=cache_dir), PartStore(parts_dir)
    share = _Share(execute_here(evaluator, store, progress=progress if rank == 0 else False), rank, world, group)
    if world > 1:
        _same_weights(model.objective, share.src, group)
    if rank != 0:
        share.follow()
        return None
    handed = False

    def execute(units: list[Unit]) -> None:
        nonlocal handed
        handed = True
        ran = share.lead(units)
        if record is not None:
            record(ran)

    try:
        return evaluate(cfg, chosen=select_metrics(cfg, chosen), data=data, store=store, execute=execute,
                        extractor=lambda: evaluator.extractor, device=model.device, progress=bool(progress))
    finally:
        if not handed:
            share.release()
