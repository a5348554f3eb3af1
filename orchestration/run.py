"""One run: its schema (`RunConfig`, the task plus where and how it runs, each field with its
role), its metadata (`RunMeta`), and `train_and_evaluate`, the body every backend runs on
each rank (a plain process, torchrun, a Ray Train worker, a submitit task).

The process group (if any) is already set up by the launcher; rank and world size come
from it. Every rank trains, and every rank takes part in evaluating the EMA model (a
sweep's metric at each checkpoint, the whole evaluation at the end): its units are sharded
over the ranks (`lzn.evaluate.evaluate_on_ranks`), so no GPU of the allocation idles while
one evaluates. Rank 0 alone writes the run folder's logs, metrics.json and the PNG
artifacts, and reports all of it to MLflow (`RunMeta.tracking_uri`; None: no tracking).
The data is prepared before this runs.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lzn.data.batches import StepBatcher
from lzn.data.loader import prefetch_in_memory
from lzn.data.reader import ImageSplit, in_memory_problem, load_pixel_split
from lzn.data.shards import read_manifest
from lzn.distributed import make_gather, rank, world_size
from lzn.errors import UserError
from lzn.eval_data import EvalData, InMemoryData, ShardData
from lzn.evaluate import PartStore, evaluate_on_ranks, metric_for_key
from lzn.hardware import HardwareConfig, apply_hardware
from lzn.inference import LZNModel
from lzn.roles import Role, Roles, role_field
from lzn.task import TWO_VIEW_OBJECTIVES, DataConfig, TaskConfig, build_objective, validate_task
from lzn.trainer import Trainer
from orchestration.folder import EvalFolder, RunFolder, write_json
from orchestration.mlflow.node_metrics import NodeMetricsMonitor
from orchestration.mlflow.tracker import RunTracker, TrackingConfig, end_status, flatten_params
from orchestration.plots import write_run_artifacts
from orchestration.reporting import checkpoint_report, record_checkpoint_metric



BACKENDS = ("local", "ray")


@dataclass
class RayTrainerConfig:
    """The `trainer:` section: the Ray Train workers of a run (backend=ray)."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray's CPU reservation; torch threads: max(1, round(cpus_per_worker))
    max_failures: int = 3  # worker failures a run recovers from (each restarts from the last checkpoint)
    # Elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): a run that loses workers (a node
    # gone) restarts from its last checkpoint on as many as remain, down to min_workers, and grows back
    # when they return. Every worker count in [min_workers, num_workers] must divide train.batch_size: the
    # global batch stays fixed and its rows are a function of (seed, step), so the losses do not change.
    # None: num_workers, a fixed size; a restart then waits up to node_wait_s for the lost workers' resources.
    min_workers: Optional[int] = None
    node_wait_s: float = 600.0


@dataclass
class RunConfig(TaskConfig):
    """The run schema: lzn's task (what is trained, how long, how it is evaluated) and where
    and how it runs. Every field's role is declared here or in lzn's dataclasses (`lzn.roles`)."""
    output_dir: str = role_field(Role.RUNTIME, default="outputs")
    scale: str = role_field(Role.RUNTIME, default="full")  # set by the scale group (conf/scale/*.yaml)
    # One folder per (task, scale, seed) unless named: re-running the same command resumes it.
    run_name: str = role_field(Role.RUNTIME, default="${scale}-seed${train.seed}")
    resume: bool = role_field(Role.RUNTIME, default=True)
    device: str = role_field(Role.RUNTIME, default="auto")  # auto: cuda when available, else cpu (the local backend)
    # local: this process (or torchrun's); ray: Ray Train workers on $RAY_ADDRESS or a local Ray.
    backend: str = role_field(Role.RUNTIME, default="local")
    trainer: RayTrainerConfig = role_field(Role.RUNTIME, default_factory=RayTrainerConfig)
    tracking: TrackingConfig = role_field(Role.RUNTIME, default_factory=TrackingConfig)
    # How the networks run on the device (conf/hardware/*.yaml; lzn.hardware): TF32, layout, compile.
    hardware: HardwareConfig = role_field(Role.RUNTIME, default_factory=HardwareConfig)


RUN_ROLES = Roles(RunConfig)


def run_params(cfg: RunConfig) -> dict[str, str]:
    """The run's settings as flat MLflow params: {"optim.lr.encoder": "0.001", ...}."""
    return flatten_params(dataclasses.asdict(cfg))


def as_run_config(cfg: RunConfig) -> RunConfig:
    """The plain RunConfig of a config that extends it (a sweep's, an evaluation's, the DAG's)."""
    return RunConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})


def refused_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What a run folder may not resume with: the changes `new` makes to `old` (flat params)
    that change what is trained. Both resume checks call it: the run folder's own record
    (`trained_with.json`) and the MLflow run it continues."""
    return RUN_ROLES.refused_changes(old, new)


def validate_trainer(cfg: RayTrainerConfig, global_batch: int) -> None:
    if cfg.num_workers < 1:
        raise UserError(f"trainer.num_workers must be >= 1, got {cfg.num_workers}")
    if not cfg.cpus_per_worker > 0:
        raise UserError(f"trainer.cpus_per_worker must be > 0, got {cfg.cpus_per_worker}")
    if global_batch % cfg.num_workers:
        raise UserError(f"train.batch_size={global_batch} is the global batch: it must be divisible by "
                        f"trainer.num_workers={cfg.num_workers}")
    if cfg.min_workers is not None:
        if not 1 <= cfg.min_workers <= cfg.num_workers:
            raise UserError(f"trainer.min_workers must be in [1, trainer.num_workers={cfg.num_workers}] (or null: "
                            f"a fixed size), got {cfg.min_workers}")
        if bad := [w for w in range(cfg.min_workers, cfg.num_workers + 1) if global_batch % w]:
            raise UserError(f"trainer.min_workers={cfg.min_workers}: an elastic run may have any worker count in "
                            f"[{cfg.min_workers}, {cfg.num_workers}], and train.batch_size={global_batch} (the global "
                            f"batch) is not divisible by {bad}; raise trainer.min_workers or change the batch size")
    if not cfg.node_wait_s > 0:
        raise UserError(f"trainer.node_wait_s must be > 0 seconds, got {cfg.node_wait_s}")


def validate_run(cfg: RunConfig) -> None:
    """Every check a run's settings get before anything starts: the task's, the backend, the
    Ray workers (backend=ray)."""
    validate_task(cfg)
    if cfg.backend not in BACKENDS:
        raise UserError(f"backend={cfg.backend!r} is not known; expected one of {list(BACKENDS)}")
    if cfg.backend == "ray":
        validate_trainer(cfg.trainer, cfg.train.batch_size)
    if cfg.data.loader_workers < 0:
        raise UserError(f"data.loader_workers must be >= 0 (0: decode on the training process), "
                        f"got {cfg.data.loader_workers}")


def streams(data: DataConfig) -> bool:
    """Whether the train split streams (data.loader; auto: when it does not fit in memory):
    Ray Data on backend=ray, a DataLoader over the shards on the local/torchrun backend."""
    if data.loader != "auto":
        return data.loader == "stream"
    return in_memory_problem(data.dataset_dir, image_size=data.image_size, channels=data.channels) is not None


@dataclass
class RunMeta:
    """What the launcher knows and the workers need: where and how to track (the run's
    `tracking:` section and the server it resolved to), and the run's identity."""

    tracking_uri: str | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: str = "lzn"
    run_name: str = "run"
    config_yaml: str = ""
    tags: dict[str, str] = field(default_factory=dict)


class JsonlLogger:
    """Training metrics as JSON lines in the run folder (rank 0). A resumed run recomputes
    the steps after its checkpoint: those already in the file are not written twice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last_step = 0
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a line cut short by a crash: drop it
                text = text[: text.rfind("\n") + 1]
                self.path.write_text(text)
            for row in self.rows():
                self.last_step = max(self.last_step, int(row["step"]))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.last_step = step

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


class TimedCallbacks:
    """Rank 0's callbacks behind one, timing what reporting costs the training loop."""

    def __init__(self, callbacks: list):
        self.callbacks, self.seconds = callbacks, 0.0

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_log(step, metrics)
        self.seconds += time.perf_counter() - start

    def before_checkpoint(self, step: int) -> None:
        start = time.perf_counter()
        for cb in self.callbacks:
            if hasattr(cb, "before_checkpoint"):
                cb.before_checkpoint(step)
        self.seconds += time.perf_counter() - start

    def on_checkpoint(self, step: int, path) -> None:
        start = time.perf_counter()
        for cb in self.callbacks:
            if hasattr(cb, "on_checkpoint"):
                cb.on_checkpoint(step, path)
        self.seconds += time.perf_counter() - start


LOCK_WAIT_S = 120.0


def _lock_run_folder(run_dir: Path, wait_s: float = LOCK_WAIT_S):
    """An exclusive lock on the run folder for this rank-0 process: a rerun whose previous
    attempt is still winding down (a driver killed a moment ago) waits for it instead of
    writing the same logs and MLflow run. The lock goes with the process."""
    handle = open(RunFolder(run_dir).lock, "a")
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{run_dir} is in use by another training process (held {wait_s:g} s): "
                                   "stop it, or choose another run_name=") from None
            if not told:
                print(f"waiting for the process that holds {run_dir}/.lock to finish", file=sys.stderr)
                told = True
            time.sleep(1.0)


def _open_tracker(cfg: RunConfig, run_dir: Path, meta: RunMeta) -> RunTracker | None:
    """The rank-0 MLflow run. A server that does not answer (a restarted worker during an
    outage) is retried for `tracking.open_timeout_s`; then training goes on untracked, with the
    step metrics in train_metrics.jsonl, rather than dying for its logs."""
    t = meta.tracking
    deadline, told = time.monotonic() + t.open_timeout_s, False
    while True:
        try:
            return RunTracker.open(meta.tracking_uri, meta.experiment, run_dir, run_name=meta.run_name,
                                   params=run_params(cfg), config_yaml=meta.config_yaml, tags=meta.tags,
                                   refused_changes=refused_changes, system_metrics=t.system_metrics,
                                   flush_every_s=t.flush_every_s, system_metrics_every_s=t.system_metrics_every_s)
        except ValueError:  # the run refuses this config: not a connection problem
            raise
        except Exception as e:
            if time.monotonic() > deadline:
                print(f"[tracking] MLflow server {meta.tracking_uri} still unreachable ({type(e).__name__}): "
                      f"training on WITHOUT MLflow tracking; step metrics are in {RunFolder(run_dir).train_log}",
                      file=sys.stderr, flush=True)
                return None
            if not told:
                print(f"[tracking] MLflow server {meta.tracking_uri} unreachable ({type(e).__name__}: "
                      f"{str(e)[:200]}); retrying for {t.open_timeout_s:g} s", file=sys.stderr, flush=True)
                told = True
            time.sleep(5.0)


def node_metrics(meta: RunMeta | None, run_dir: Path,
                 local_rank: int) -> tuple[RunMeta | None, NodeMetricsMonitor | None]:
    """(the meta to train with, this node's system-metrics monitor or None) for a run of
    several processes (Ray Train, torchrun, a Slurm DDP job). With system metrics on, the
    local rank 0 of every node samples its node as system/<hostname>/... in the run rank 0
    opens, node 0 included: rank 0's tracker then samples nothing of its own."""
    if meta is None or not meta.tracking_uri or not meta.tracking.system_metrics:
        return meta, None
    meta = dataclasses.replace(meta, tracking=dataclasses.replace(meta.tracking, system_metrics=False))
    if local_rank != 0:
        return meta, None
    return meta, NodeMetricsMonitor(run_dir, meta.tracking_uri, socket.gethostname(),
                                    every_s=meta.tracking.system_metrics_every_s).start()


def train_and_evaluate(cfg: RunConfig, run_dir: str | Path, *, device: torch.device, meta: RunMeta | None = None,
                       checkpoints=None, batch_source: Callable | None = None, evaluate: bool = True,
                       report_metric: str | None = None, report_mode: str = "min",
                       progress: bool | Callable = True) -> dict:
    """Train the run `cfg` in `run_dir`, resuming from its latest
    checkpoint; every rank evaluates a share of the units, rank 0 returns the metrics (other
    ranks: the train summary).

    batch_source: None holds the train split in memory as uint8 (batches a function of (seed,
    step), gathered ahead on a thread); else a callable that takes this rank's `StepBatcher`
    and returns `step -> batch` (the Ray Data stream, the shards through a DataLoader), closed
    at the end when it has a `close()`. The evaluation reads the split held in memory, else
    (streamed) the shards. evaluate=False leaves it to the pipeline's evaluate stage
    (`pipelines.stages.evaluate`). report_metric: a metrics.json key that every rank's checkpoint
    store evaluates on the EMA model at every checkpoint (`report_metrics`, a collective: the
    units sharded over the ranks) and rank 0's hands to its report (a sweep's early-stopping
    signal). progress: rank 0's training and evaluation
    bars (`Trainer`'s: True tqdm here, False none, or a tqdm-like class to draw them with).
    """
    meta = meta or RunMeta()
    run_dir = Path(run_dir)
    r, world = rank(), world_size()
    d = cfg.data
    two_view = cfg.objective in TWO_VIEW_OBJECTIVES
    split = None  # uint8 in memory; the evaluation reads it as float, unit by unit (streamed: the shards)
    if batch_source is None:
        split = load_pixel_split(d.dataset_dir, image_size=d.image_size, channels=d.channels)
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    objective = build_objective(cfg, make_gather() if world > 1 else None).to(device)
    objective = apply_hardware(objective, cfg.hardware, device)  # before the trainer copies it into the EMA
    batcher = StepBatcher(global_batch=cfg.train.batch_size, seed=cfg.train.seed, augment=d.augment,
                          image_size=d.image_size, two_view=two_view, rank=r, world=world, device=device,
                          pixel_max=split.pixel_max if split is not None else read_manifest(d.dataset_dir)["pixel_max"])
    # The host side of the next batches (rows, gather, pinning) runs ahead of the training
    # thread; `batches.close()` below stops it.
    batches = prefetch_in_memory(split.train_pixels, split.train_labels, batcher) if batch_source is None \
        else batch_source(batcher)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks, tracker, jsonl, lock = [], None, None, None
    if r == 0:
        lock = _lock_run_folder(run_dir)
        jsonl = JsonlLogger(RunFolder(run_dir).train_log)
        callbacks.append(jsonl)
    timed = TimedCallbacks(callbacks)
    try:
        trainer = Trainer(objective, cfg.optim, cfg.train, batches, run_dir=run_dir,
                          callbacks=[timed] if r == 0 else [], device=device, checkpoints=checkpoints,
                          progress=progress)
        data = _evaluation_data(cfg, split)
        if report_metric:  # every rank's store: the evaluation at each checkpoint is sharded over the ranks
            checkpoints.report_metrics = _checkpoint_evaluation(cfg, trainer, data, device, run_dir, report_metric,
                                                                report_mode)
        if r == 0 and meta.tracking_uri:  # after everything that can refuse the config
            tracker = _open_tracker(cfg, run_dir, meta)
            if tracker is not None:
                tracker.log_dataset(cfg.data.dataset_dir)  # the UI's Dataset column: name, checksum, rows
                callbacks.append(tracker)
        metrics = dict(trainer.fit())
        _close(batches)  # training is over: the prefetcher's thread, the stream's reader processes
        evaluated = _evaluate(cfg, trainer, data, RunFolder(run_dir).final_evaluation(trainer.step), device,
                              progress=trainer.progress) if evaluate else None  # every rank computes a share
        if r == 0:
            metrics["train/logging_seconds"] = timed.seconds
            _report(cfg, trainer, data, evaluated, run_dir, device, meta, jsonl, tracker, metrics)
    except BaseException as e:
        if tracker is not None:
            tracker.close(end_status(e))  # a trial that Tune stops ends KILLED, an error FAILED
        raise
    else:
        if tracker is not None:
            tracker.close("FINISHED")
    finally:
        _close(batches)  # again on a failure (close is idempotent)
        if lock is not None:
            lock.close()  # releases the flock
    return metrics


def _close(batches) -> None:
    """Stop what feeds `batches` (a prefetching thread, DataLoader processes), if anything does."""
    if hasattr(batches, "close"):
        batches.close()


def _evaluation_data(cfg: RunConfig, split) -> EvalData:
    """What the run evaluates on: the split it holds in memory, else (streamed) the shards."""
    d = cfg.data
    if split is not None:
        return InMemoryData(split, d.dataset_dir)
    return ShardData(d.dataset_dir, image_size=d.image_size, channels=d.channels)


def _evaluate(cfg: RunConfig, trainer: Trainer, data: EvalData, folder: EvalFolder, device: torch.device, *,
              chosen: list[str] | None = None, progress: bool | Callable = False) -> dict | None:
    """Every rank, at the same point: the evaluation of the EMA model (`chosen` metrics; None:
    all that apply), its units sharded over the ranks, their parts in `folder` (the run
    folder: every rank sees it). Rank 0 returns the metrics, the others None. The parts go once
    reduced (the probe's features of a large split are gigabytes); which rank computed each
    stays in `folder.part_ranks`."""
    store = PartStore(folder.parts)
    if rank() == 0:  # an earlier attempt's, maybe of other settings; the others write only after rank 0 plans
        store.clear()

    def record(ran: dict[str, int]) -> None:
        folder.parts.mkdir(parents=True, exist_ok=True)
        write_json(folder.part_ranks, ran)

    model = LZNModel(trainer.ema, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), device)
    try:
        return evaluate_on_ranks(cfg, model, data, cache_dir=Path(cfg.output_dir) / ".cache", parts_dir=folder.parts,
                                 chosen=chosen, progress=progress, record=record)
    finally:
        if rank() == 0:  # every rank is past the barrier (or never started) when rank 0 is here
            store.clear()


def _checkpoint_evaluation(cfg: RunConfig, trainer: Trainer, data: EvalData, device: torch.device, run_dir: Path,
                           key: str, mode: str) -> Callable[[int], dict | None]:
    """step -> {tune_key(key): value, "report": checkpoint index} of the EMA model now (rank 0;
    the other ranks: None): the metric alone, sharded over every rank, so every rank calls it
    at the same checkpoint (the checkpoint store's save does), and appended to the run folder's
    checkpoint log. An evaluation that fails (NaN samples of a diverged trial) reports the
    worst value for `mode` instead of failing the run, so the scheduler stops the trial rather
    than Ray retrying it."""
    metric = metric_for_key(cfg, key)

    def evaluate_now(step: int) -> dict | None:
        folder = RunFolder(run_dir).checkpoint_evaluation(step)
        if rank() != 0:  # a unit that fails here fails rank 0's evaluation, which reports it
            _evaluate(cfg, trainer, data, folder, device, chosen=[metric])
            return None
        try:
            value = float(_evaluate(cfg, trainer, data, folder, device, chosen=[metric])[key])
        except (ValueError, RuntimeError) as e:
            value = math.inf if mode == "min" else -math.inf
            print(f"[sweep] evaluating {key} at step {step} failed ({type(e).__name__}: {e}); reporting {value}",
                  file=sys.stderr, flush=True)
        record_checkpoint_metric(RunFolder(run_dir), step, key, value)
        return checkpoint_report(key, value, step, cfg.train)

    return evaluate_now


def _zones_split(cfg: RunConfig, data: EvalData) -> ImageSplit:
    """The held-out images the zone map draws (the first inference batch), as a split."""
    images, labels = data.rows("test", 0, min(cfg.eval.batch_size, data.size("test")))
    return ImageSplit(images[:0], labels[:0], images, labels)


def _report(cfg: RunConfig, trainer: Trainer, data: EvalData, evaluated: dict | None, run_dir: Path,
            device: torch.device, meta: RunMeta, jsonl: JsonlLogger, tracker: RunTracker | None,
            metrics: dict) -> None:
    """Rank 0: add the evaluation (None: left to the evaluate stage) to `metrics` (the training
    summary), write metrics.json and the plots, and send it all to MLflow with the final
    checkpoint and the registered model."""
    model = LZNModel(trainer.ema, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), device)
    run_folder = RunFolder(run_dir)
    rows = jsonl.rows()
    pngs = write_run_artifacts(cfg, model, _zones_split(cfg, data), rows, run_folder.artifacts)
    if evaluated is not None:
        metrics.update(evaluated)
    else:  # the evaluate stage's numbers of this very checkpoint stay (a re-run of train)
        before = run_folder.read_metrics() or {}
        if before.get("eval/checkpoint_step") == float(trainer.step):
            metrics.update({k: v for k, v in before.items() if k.startswith("eval/") and k not in metrics})
    run_folder.write_metrics(metrics)
    if tracker is None:
        return
    # A key the last step logged (train/skipped_steps) is in MLflow at this step already: once per step.
    stepped = set(rows[-1]) if rows and rows[-1]["step"] == trainer.step else set()
    tracker.log_metrics({k: v for k, v in metrics.items() if k not in stepped}, step=trainer.step)
    for png in pngs:
        tracker.log_artifact(png, "plots")
    tracker.log_artifact(run_folder.metrics)
    if trainer.last_checkpoint is not None:
        tracker.log_artifact(trainer.last_checkpoint, "checkpoint")
    if meta.tracking.register_model:
        alias = meta.tracking.model_alias
        version = tracker.register_model(trainer.ema, cfg, f"lzn-{cfg.name}", alias)
        if version is not None:
            print(f"registered model lzn-{cfg.name} version {version} as @{alias}", file=sys.stderr)

