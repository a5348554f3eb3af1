"""The stage DAG on every rank of one torch.distributed process group: `pipelines.run` under
torchrun, or as the tasks of a Slurm job with slurm.launcher=ddp (WORLD_SIZE, RANK,
MASTER_ADDR in the environment).

The process group is set up once for all stages (`process_group`) and destroyed at the end.
`Ranks` is what the DAG (pipelines.dag) and the evaluate stage ask of it:
- `agree`: every rank decides (a stage is up to date or not, from the records on shared
  storage) and the decisions are all-gathered before any rank writes; ranks that decide
  differently (a run folder that is not on storage every rank sees) fail on every rank,
  naming what each saw.
- `settle`: after a step every rank's outcome is all-gathered, so a failure on one rank (rank
  0's prepare) fails the others with its message instead of leaving them at the next collective.
- `lead`: rank 0, the only rank that runs the one-process stages (prepare, report) and writes
  the DAG's records; train runs on every rank (DDP), evaluate sharded over them
  (lzn.evaluate.evaluate_on_ranks).
Without a process group (one process) each of these is the plain call.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from lzn.distributed import OtherRankFailed, settle

__all__ = ["OtherRankFailed", "Ranks", "process_group"]

T = TypeVar("T")


class Ranks:
    """This process's place in the default process group (none: rank 0 of 1)."""

    def __init__(self):
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def _gather(self, mine) -> list:
        if self.world == 1:
            return [mine]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)  # the barrier
        return gathered

    def settle(self, what: str, error: BaseException | None) -> None:
        """Every rank, at the same point, after `what`: raises on every rank when it failed on any
        (this rank's own error as it is; another's as a UserError if it was one, else OtherRankFailed)."""
        settle(what, error)

    def agree(self, what: str, decide: Callable[[], T]) -> T:
        """decide() on every rank, the same value everywhere or an error on every rank."""
        value, error = None, None
        try:
            value = decide()
        except Exception as e:  # noqa: BLE001 - every rank must reach the all-gather; settle raises it
            error = e
        self.settle(what, error)
        seen = self._gather(value)
        if any(v != seen[0] for v in seen):
            raise RuntimeError(f"the ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in
                               enumerate(seen)) + "; every rank must see the same run folder (shared storage)")
        return value

    def on_lead(self, what: str, fn: Callable[[], T]) -> T | None:
        """fn() on rank 0 while the others wait; its failure fails every rank. None off rank 0."""
        result, error = None, None
        if self.lead:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - raised on every rank by settle
                error = e
        self.settle(what, error)
        return result


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """The process group of WORLD_SIZE > 1 ranks (NCCL on CUDA, else Gloo), set up here and
    destroyed on the way out; with one process, or a group that exists already, just `Ranks`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield Ranks()
        return
    from orchestration.network import pick_for_master

    pick_for_master()  # GLOO/NCCL_SOCKET_IFNAME: the interface towards MASTER_ADDR, where unset
    if device.type == "cuda":  # before NCCL starts: each rank its own GPU, also for an evaluation alone
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks()
    finally:
        dist.destroy_process_group()
