"""The `slurm:` config and its checks: `SlurmSettings` (partition, nodes, GPUs, time, account,
QoS and the launcher), what values can make a job (`validate_settings`), and `SlurmError`,
the refusal every Slurm check raises before anything is submitted."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lzn.errors import UserError

LAUNCHERS = ("ray", "ddp")
class SlurmError(UserError):
    """The submit host or the settings cannot run the job: said before anything is submitted."""


@dataclass
class SlurmSettings:
    """The `slurm:` section (pipelines/conf/slurm/<name>.yaml)."""
    partition: Optional[str] = None  # None: the cluster's default partition
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    # ddp: processes per node (None: one per GPU, else 1); ray: always one per node.
    tasks_per_node: Optional[int] = None
    mem_gb: Optional[float] = None  # per node; None: the partition's default
    time_min: int = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    launcher: str = "ray"  # ray: a Ray cluster on the allocation; ddp: torch.distributed, one process per task
    folder: Optional[str] = None  # submitit's files (%j: the job id); None: <run folder>/slurm/%j
    job_name: str = "lzn"
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # time-limit requeues before the job gives up (preemptions do not count)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)
    ray_start_timeout_s: float = 120.0


def tasks_per_node(s: SlurmSettings) -> int:
    if s.launcher == "ray":
        return 1
    return s.tasks_per_node or max(1, s.gpus_per_node)


def validate_settings(s: SlurmSettings) -> None:
    """Values that cannot make a job, each named with what was expected."""
    if s.launcher not in LAUNCHERS:
        raise SlurmError(f"slurm.launcher={s.launcher!r} is not known; expected one of {list(LAUNCHERS)}")
    checks = [("nodes", s.nodes, 1), ("gpus_per_node", s.gpus_per_node, 0), ("cpus_per_task", s.cpus_per_task, 1),
              ("time_min", s.time_min, 1), ("signal_delay_s", s.signal_delay_s, 0), ("max_requeues", s.max_requeues, 0)]
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise SlurmError(f"slurm.{name} must be an integer >= {low}, got {value!r}")
    if s.tasks_per_node is not None and s.tasks_per_node < 1:
        raise SlurmError(f"slurm.tasks_per_node must be >= 1 (or null: one per GPU), got {s.tasks_per_node}")
    if s.launcher == "ray" and s.tasks_per_node not in (None, 1):
        raise SlurmError(f"slurm.tasks_per_node={s.tasks_per_node} with slurm.launcher=ray: Ray runs one task per "
                         "node and schedules its workers itself; leave it null (or use slurm.launcher=ddp)")
    if s.mem_gb is not None and not s.mem_gb > 0:
        raise SlurmError(f"slurm.mem_gb must be > 0 (or null: the partition's default), got {s.mem_gb}")
    if s.signal_delay_s >= s.time_min * 60:
        raise SlurmError(f"slurm.signal_delay_s={s.signal_delay_s} must be shorter than the time limit "
                         f"(slurm.time_min={s.time_min} = {s.time_min * 60} s)")
    if not s.job_name or any(c.isspace() for c in s.job_name):
        raise SlurmError(f"slurm.job_name must be a non-empty word, got {s.job_name!r}")
