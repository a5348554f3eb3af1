"""`python -m pipelines.slurm task=<name> [mode=train|sweep] [slurm=local|cluster] [slurm.partition=P]
[slurm.nodes=N] [slurm.gpus_per_node=G] [slurm.launcher=ray|ddp] [wait=false] [key=value ...]`
(and `make slurm TASK=... [SWEEP=1]`): the task's stage DAG (pipelines.run: prepare ->
train -> evaluate -> report, as `make train`) or its sweep (pipelines.sweep) as a Slurm job,
submitted with submitit.

mode=, wait=, poll_s= and slurm.* configure the job (pipelines/conf/slurm.yaml and the
`slurm` group, orchestration.slurm.settings.SlurmSettings); every other override is the pipeline's,
and is checked here against its config before anything is submitted, with the partition
and the submit host (orchestration.slurm.submit.preflight). The job runs the pipeline command
itself, on a Ray cluster brought up on the allocation (slurm.launcher=ray; the DAG gets
backend=ray: training on Ray Train workers, the evaluate stage sharded over Ray actors, both
across the allocation's nodes) or as plain multi-task DDP (slurm.launcher=ddp, mode=train
only, backend=local): every task is one rank of one process group and runs the same DAG
(pipelines.ranks): prepare and report on rank 0, training as DDP on every rank, the evaluate
stage sharded over the same ranks (lzn.evaluate.evaluate_on_ranks). With either launcher a
stage that is done is skipped, also by a requeued attempt.

The job writes to the same run folder as the same command run by hand (outputs/<task>/
<run_name>, a sweep's outputs/<task>/sweeps/<sweep.name>), which is what lets a requeued or
preempted job resume from its last checkpoint into the same MLflow run. submitit's files and
the logs are in <run folder>/slurm/<job id>/ unless slurm.folder= says otherwise. By default
the command waits, streaming the job's log, and exits non-zero unless the job completes;
wait=false returns once the job is submitted.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from orchestration.slurm.settings import SlurmError, SlurmSettings, tasks_per_node, validate_settings
from orchestration.slurm.submit import REQUEUE_GRACE_S, check_reachable_tracking, is_final, job_state, preflight, submit
from lzn.errors import UserError
from lzn.task import validate_task
from orchestration.run import RunConfig, validate_trainer
from orchestration.slurm.job import PipelineJob
from pipelines.cli import EXIT_BAD_INPUT
from pipelines.config import to_run_config

CONF_DIR = Path(__file__).resolve().parent / "conf"
OWN_KEYS = ("mode", "wait", "poll_s")  # and slurm, slurm.*: the rest of an override list is the pipeline's
MODES = {"train": ("run", "pipelines.run"), "sweep": ("sweep", "pipelines.sweep")}  # (Hydra config, module)


@dataclass
class SlurmRun:
    mode: str = "train"  # train: pipelines.run (on every DDP task with slurm.launcher=ddp); sweep: pipelines.sweep
    wait: bool = True  # follow the job to its end (streaming its log) and exit with its outcome
    poll_s: float = 2.0
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


ConfigStore.instance().store(name="slurm_schema", node=SlurmRun)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(this command's overrides, the pipeline's): by key, `+`/`~` prefixes ignored."""
    own, pipeline = [], []
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        mine = key in OWN_KEYS or key == "slurm" or key.startswith("slurm.")
        (own if mine else pipeline).append(arg)
    return own, pipeline


def _compose(config_name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


def job_settings(overrides: list[str]) -> SlurmRun:
    run = OmegaConf.to_object(_compose("slurm", overrides))
    if run.mode not in MODES:
        raise SlurmError(f"mode={run.mode!r} is not known; expected one of {list(MODES)}")
    if not run.poll_s > 0:
        raise SlurmError(f"poll_s must be > 0, got {run.poll_s}")
    validate_settings(run.slurm)
    return run


def pipeline_config(mode: str, overrides: list[str]):
    """The pipeline's validated config and its run folder (Hydra's hydra.run.dir for it)."""
    dcfg = _compose(MODES[mode][0], overrides, hydra=True)
    run_dir = Path(dcfg.hydra.run.dir).resolve()
    with open_dict(dcfg):
        del dcfg["hydra"]
    return to_run_config(dcfg), run_dir


def check_fits(cfg: RunConfig, run: SlurmRun) -> None:
    """The pipeline fits the allocation, named by what does not: a Ray job that cannot get its
    workers would wait forever inside the allocation."""
    s = run.slurm
    if s.launcher == "ddp":
        validate_task(cfg)
        if run.mode != "train":
            raise SlurmError(f"mode={run.mode} needs Ray Tune: use slurm.launcher=ray "
                             "(ddp runs the stage DAG, no sweeps)")
        world = s.nodes * tasks_per_node(s)
        if cfg.train.batch_size % world:
            raise SlurmError(f"train.batch_size={cfg.train.batch_size} is the global batch: it must be divisible by "
                             f"the {world} DDP processes (slurm.nodes x tasks per node)")
        return
    t = cfg.trainer
    validate_task(cfg)
    validate_trainer(t, cfg.train.batch_size)
    cpus = s.nodes * s.cpus_per_task
    if t.num_workers * t.cpus_per_worker > cpus:
        raise SlurmError(f"trainer.num_workers={t.num_workers} x trainer.cpus_per_worker={t.cpus_per_worker:g} needs "
                         f"{t.num_workers * t.cpus_per_worker:g} CPUs; the allocation has {cpus} "
                         f"(slurm.nodes={s.nodes} x slurm.cpus_per_task={s.cpus_per_task})")
    if t.use_gpu and t.num_workers > s.nodes * s.gpus_per_node:
        raise SlurmError(f"trainer.num_workers={t.num_workers} GPU workers need as many GPUs; the allocation has "
                         f"{s.nodes * s.gpus_per_node} (slurm.nodes={s.nodes} x slurm.gpus_per_node={s.gpus_per_node})")


def job_command(mode: str, overrides: list[str], launcher: str) -> list[str]:
    command = [sys.executable, "-m", MODES[mode][1], *overrides]
    if mode == "train":  # last: it wins over a backend= of the user's
        command.append("backend=ray" if launcher == "ray" else "backend=local")
    return command


def tracking_env(cfg: RunConfig, partition: str) -> dict[str, str]:
    """The job logs where this command would: the same server, resolved here (a local one is
    started here when none is named, as pipelines.train does), and one the nodes can reach."""
    from orchestration.mlflow.tracker import resolve_tracking_uri

    if not cfg.tracking.enabled:
        return {}
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_reachable_tracking(uri, partition)
    else:
        check_reachable_tracking("http://127.0.0.1", partition)  # where a local server would listen
    uri = resolve_tracking_uri(cfg.tracking, cfg.output_dir)
    print(f"MLflow tracking: {uri}", flush=True)
    return {} if cfg.tracking.uri else {"MLFLOW_TRACKING_URI": uri}


class _LogFollower:
    """Copies what the job appends to its stdout/stderr files onto ours."""

    def __init__(self, paths):
        self.files = [(Path(paths.stdout), sys.stdout), (Path(paths.stderr), sys.stderr)]
        self.offsets = [0, 0]

    def poll(self) -> None:
        for i, (path, out) in enumerate(self.files):
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self.offsets[i])
                chunk = f.read()
            if chunk:
                self.offsets[i] += len(chunk)
                out.write(chunk.decode(errors="replace"))
                out.flush()


def follow(job, poll_s: float, requeue_grace_s: float = REQUEUE_GRACE_S) -> str:
    """Stream the job's log until Slurm reports a final state; returns that state. PREEMPTED
    and NODE_FAIL count only once they have lasted `requeue_grace_s`: the job is requeueable and
    usually comes back to PENDING. UNKNOWN (slurmctld not answering) is asked again, 30 times."""
    logs, state, unknown, since = _LogFollower(job.paths), "PENDING", 0, time.monotonic()
    while True:
        new = job_state(job.job_id)
        if new != state:
            print(f"[slurm] job {job.job_id}: {new}", file=sys.stderr, flush=True)
            state, since = new, time.monotonic()
        unknown = unknown + 1 if state == "UNKNOWN" else 0
        if is_final(state, time.monotonic() - since, requeue_grace_s) or unknown > 30:
            time.sleep(min(poll_s, 1.0))  # the last lines reach the shared file a moment after
            logs.poll()
            return state
        logs.poll()
        time.sleep(poll_s)


def run(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    settings = job_settings(own)
    s = settings.slurm
    cfg, run_dir = pipeline_config(settings.mode, overrides)
    check_fits(cfg, settings)
    partition = preflight(s)  # before a tracking server is started for a job that cannot be submitted
    folder = Path(s.folder) if s.folder else run_dir / "slurm" / "%j"
    job = PipelineJob(job_command(settings.mode, overrides, s.launcher), launcher=s.launcher, cwd=os.getcwd(),
                      env=tracking_env(cfg, partition), gpus_per_node=s.gpus_per_node,
                      ray_start_timeout_s=s.ray_start_timeout_s)
    submitted = submit(s, job, folder.absolute())
    what = "sweep" if settings.mode == "sweep" else "training"
    print(f"submitted {what} of {cfg.name} as Slurm job {submitted.job_id} "
          f"({s.nodes} node(s), launcher={s.launcher})\n"
          f"  job folder: {submitted.paths.folder}\n  stdout:     {submitted.paths.stdout}\n"
          f"  stderr:     {submitted.paths.stderr}\n  run folder: {run_dir}\n"
          f"  command:    {' '.join(job.command)}", flush=True)
    if not settings.wait:
        print(f"follow it: squeue -j {submitted.job_id}; tail -f {submitted.paths.stdout}  "
              f"(cancel: scancel {submitted.job_id})", flush=True)
        return 0
    try:
        state = follow(submitted, settings.poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; Slurm job {submitted.job_id} goes on (cancel it: scancel {submitted.job_id})",
              file=sys.stderr)
        return 130
    print(f"Slurm job {submitted.job_id} ended {state}\n{what} folder: {run_dir}", flush=True)
    if state != "COMPLETED":
        print(f"error: Slurm job {submitted.job_id} ended {state}; its log: {submitted.paths.stderr}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (UserError, HydraException, OmegaConfBaseException) as e:  # bad input: one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
