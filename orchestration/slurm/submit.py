"""Slurm through submitit: one allocation runs the same pipeline command a user runs by hand.

`SlurmSettings` is the `slurm:` config (partition, nodes, GPUs, time, account, QoS, and the
launcher). `preflight` checks the submit host and the partition before anything is
submitted; `submit` hands a `PipelineJob` (orchestration.slurm.job) to submitit, which runs
it on every task of the allocation:

- launcher=ray: one task per node. Task 0 starts a Ray head (`ray start --head --block`,
  every port free on its node, a private temp folder named by job id and restart, token
  authentication), the other tasks join it as workers, and task 0 runs the pipeline with
  RAY_ADDRESS set. The head's address and token reach the workers through a file in the job
  folder named by job id and restart (two jobs sharing a slurm.folder never read each
  other's). The Ray processes are stopped by their process group, never `ray stop`
  (which would stop every Ray of this user on the node, another job's included).
- launcher=ddp: plain multi-task PyTorch (`TorchDistributedEnvironment`): every task runs
  the pipeline with RANK / WORLD_SIZE / MASTER_ADDR exported, backend=local.

Every task runs under `srun --kill-on-bad-exit=1`: a task that fails ends the job, instead of
the others waiting for it until the time limit.

The pipeline runs as a subprocess (`python -m pipelines.train ...`), so no Hydra here and
the job is exactly the command a user could type. Its run folder is fixed by the command,
which is what makes preemption work: `PipelineJob` is `Checkpointable`, so on a time limit
or preemption signal submitit pickles the same submission and requeues it, and the requeued
job (the same job id, also after a plain `scontrol requeue`) runs the same command, which
resumes from the folder's last checkpoint (or the sweep's Tune state) and continues the same
MLflow run(s).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import submitit

from orchestration.slurm.settings import SlurmError, SlurmSettings, tasks_per_node, validate_settings

if TYPE_CHECKING:
    from orchestration.slurm.job import PipelineJob

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")
# Final only if they last: a requeueable job (ours are) that is preempted or loses its node
# passes through them on its way back to PENDING, which Slurm takes a few seconds to do.
MAYBE_REQUEUED = ("PREEMPTED", "NODE_FAIL")
REQUEUE_GRACE_S = 30.0


def _slurm_command(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer in 60 s: is slurmctld reachable?") from None
    if done.returncode != 0:
        hint = f"SLURM_CONF={os.environ['SLURM_CONF']}" if os.environ.get("SLURM_CONF") else (
            "SLURM_CONF is unset; for the cluster of infra/slurm/up.sh export the line it prints, "
            "`export SLURM_CONF=<its state folder>/slurm.conf`")
        raise SlurmError(f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]} ({hint})")
    return done.stdout


def partitions() -> dict[str, dict]:
    """{name: {"default": bool, "nodes": int, "state": str}} from `sinfo`."""
    found: dict[str, dict] = {}
    for line in _slurm_command(["sinfo", "-h", "-o", "%P|%D|%a"]).splitlines():
        name, nodes, state = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = found.setdefault(name, {"default": default, "nodes": 0, "state": state})
        entry["nodes"] += int(nodes)
    return found


def preflight(s: SlurmSettings) -> str:
    """Checks the submit host can submit `s`: `sbatch` on PATH, the partition known and up,
    enough nodes in it. Returns the partition the job goes to. Nothing is submitted."""
    validate_settings(s)
    missing = [tool for tool in ("sbatch", "sinfo", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise SlurmError(f"{' and '.join(f'`{t}`' for t in missing)} not found on PATH: this machine is not a Slurm "
                         "submit host. Run on a login node of your cluster (its Slurm client installed), or start "
                         "a one-node Slurm here: `eval \"$(infra/slurm/up.sh | tail -n 1)\"` (root, Debian)")
    known = partitions()
    if not known:
        raise SlurmError("`sinfo` lists no partition: this Slurm has no nodes configured")
    name = s.partition or next((p for p, v in known.items() if v["default"]), None)
    if name is None:
        raise SlurmError(f"slurm.partition is not set and the cluster has no default partition; "
                         f"known partitions: {sorted(known)}")
    if name not in known:
        raise SlurmError(f"slurm.partition={name!r} is not a partition of this cluster; known partitions: "
                         f"{sorted(known)}")
    part = known[name]
    if part["state"] != "up":
        raise SlurmError(f"partition {name!r} is {part['state']}, not up: jobs would wait; choose another of "
                         f"{sorted(known)}")
    if s.nodes > part["nodes"]:
        raise SlurmError(f"slurm.nodes={s.nodes} but partition {name!r} has {part['nodes']} node(s)")
    return name


def partition_hosts(partition: str) -> list[str]:
    """The host names of a partition's nodes."""
    nodelist = ",".join(_slurm_command(["sinfo", "-h", "-p", partition, "-o", "%N"]).split())
    return _slurm_command(["scontrol", "show", "hostnames", nodelist]).split() if nodelist else []


def check_reachable_tracking(uri: str, partition: str) -> None:
    """A tracking server on this machine's loopback is reachable from the job only when the
    partition's nodes are this machine (the local cluster of infra/slurm/up.sh)."""
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        return
    here = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    elsewhere = sorted(set(partition_hosts(partition)) - here)
    if elsewhere:
        raise SlurmError(f"the MLflow server {uri} listens on this machine's loopback, which the nodes of partition "
                         f"{partition!r} ({', '.join(elsewhere[:5])}{', ...' if len(elsewhere) > 5 else ''}) cannot "
                         "reach: set MLFLOW_TRACKING_URI (or tracking.uri=) to a server they reach (infra/mlflow/), "
                         "or tracking.enabled=false")


def sbatch_mem(mem_gb: float) -> str:
    """sbatch's --mem takes whole units only (`--mem=1.5G` is refused): whole gigabytes as G,
    anything else rounded up to whole megabytes."""
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{math.ceil(mem_gb * 1024)}M"


def executor_parameters(s: SlurmSettings, partition: str) -> dict:
    """What submitit's SlurmExecutor gets (its names for sbatch's options)."""
    params = {"job_name": s.job_name, "partition": partition, "nodes": s.nodes,
              "ntasks_per_node": tasks_per_node(s), "cpus_per_task": s.cpus_per_task, "time": s.time_min,
              "signal_delay_s": s.signal_delay_s,
              # a task that fails ends the step: the others (Ray workers, DDP ranks waiting in a
              # collective) would otherwise hold the allocation until the time limit
              "srun_args": ["--kill-on-bad-exit=1"],
              # requeueable even where the site's JobRequeue=0: preemption and `scontrol requeue` need it
              "additional_parameters": {"requeue": True}}
    optional = {"gpus_per_node": s.gpus_per_node or None, "mem": sbatch_mem(s.mem_gb) if s.mem_gb else None,
                "account": s.account, "qos": s.qos, "constraint": s.constraint, "setup": list(s.setup) or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def submit(s: SlurmSettings, job: "PipelineJob", folder: str | Path):
    """Preflight, then submit `job`; returns the submitit Job (job_id, paths.stdout, ...).
    sbatch refusing the job (an account, QoS or constraint the preflight cannot check) is a
    SlurmError with sbatch's own words, not submitit's traceback."""
    partition = preflight(s)
    Path(str(folder).split("%j")[0]).mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=s.max_requeues)
    executor.update_parameters(**executor_parameters(s, partition))
    printed = io.StringIO()  # submitit prints sbatch's complaint before raising it: said once, in the error
    try:
        with contextlib.redirect_stderr(printed):
            return executor.submit(job)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        printed = io.StringIO()
        raise SlurmError(f"sbatch refused the job: {str(e).strip()[-1000:]} (partition={partition!r}, "
                         f"account={s.account!r}, qos={s.qos!r}, constraint={s.constraint!r})") from None
    finally:
        sys.stderr.write(printed.getvalue())  # anything else submitit said


def job_state(job_id: str) -> str:
    """The job's state (RUNNING, PENDING, COMPLETED, ...) from slurmctld, which keeps finished
    jobs for MinJobAge; `sacct` after that. UNKNOWN when neither knows it, or neither answers
    (a busy or restarting slurmctld): whoever follows the job asks again."""
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=60)
        for token in done.stdout.split() if done.returncode == 0 else []:
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        if shutil.which("sacct"):
            acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], capture_output=True,
                                  text=True, timeout=60)
            if acct.returncode == 0 and acct.stdout.strip():
                return acct.stdout.split()[0].split()[0]
    except (subprocess.TimeoutExpired, OSError):
        pass
    return "UNKNOWN"


def is_final(state: str, lasted_s: float, grace_s: float = REQUEUE_GRACE_S) -> bool:
    """Whether the job is over, given a state that has lasted `lasted_s`: PREEMPTED and
    NODE_FAIL only once they have lasted `grace_s`, since a requeueable job goes from them back
    to PENDING (REQUEUED on the way) and runs again."""
    return state in FINAL_STATES and (state not in MAYBE_REQUEUED or lasted_s >= grace_s)
