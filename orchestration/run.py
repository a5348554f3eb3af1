"""One training run on one rank: the body every backend runs (a plain process, torchrun,
a Ray Train worker, a submitit task).

The process group (if any) is already set up by the launcher; rank and world size come
from it. Every rank trains; rank 0 alone writes the run folder's logs, evaluates the EMA
model, writes metrics.json and the PNG artifacts, and reports all of it to MLflow
(`RunMeta.tracking_uri`; None: no tracking). The data is prepared before this runs.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from orchestration.folder import RunFolder
from orchestration.reporting import checkpoint_report, record_checkpoint_metric


@dataclass
class RunMeta:
    """What the launcher knows and the workers need: where to track, and the run's identity."""

    tracking_uri: str | None = None
    experiment: str = "lzn"
    run_name: str = "run"
    config_yaml: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True
    system_metrics_every_s: float = 10.0
    flush_every_s: float = 5.0
    register_model: bool = True
    model_alias: str = "candidate"
    open_timeout_s: float = 300.0  # how long rank 0 waits for an unreachable server at start


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


def _open_tracker(cfg, run_dir: Path, meta: RunMeta):
    """The rank-0 MLflow run. A server that does not answer (a restarted worker during an
    outage) is retried for `meta.open_timeout_s`; then training goes on untracked, with the
    step metrics in train_metrics.jsonl, rather than dying for its logs."""
    from orchestration.mlflow.tracker import RunTracker, flatten_params

    deadline, told = time.monotonic() + meta.open_timeout_s, False
    while True:
        try:
            return RunTracker.open(meta.tracking_uri, meta.experiment, run_dir, run_name=meta.run_name,
                                   params=flatten_params(dataclasses.asdict(cfg)), config_yaml=meta.config_yaml,
                                   tags=meta.tags, system_metrics=meta.system_metrics,
                                   flush_every_s=meta.flush_every_s,
                                   system_metrics_every_s=meta.system_metrics_every_s)
        except ValueError:  # the run refuses this config: not a connection problem
            raise
        except Exception as e:
            if time.monotonic() > deadline:
                print(f"[tracking] MLflow server {meta.tracking_uri} still unreachable ({type(e).__name__}): "
                      f"training on WITHOUT MLflow tracking; step metrics are in {run_dir}/train_metrics.jsonl",
                      file=sys.stderr, flush=True)
                return None
            if not told:
                print(f"[tracking] MLflow server {meta.tracking_uri} unreachable ({type(e).__name__}: "
                      f"{str(e)[:200]}); retrying for {meta.open_timeout_s:g} s", file=sys.stderr, flush=True)
                told = True
            time.sleep(5.0)


def train_and_evaluate(cfg, run_dir: str | Path, *, device: torch.device, meta: RunMeta | None = None,
                       checkpoints=None, batch_source: Callable | None = None, evaluate: bool = True,
                       report_metric: str | None = None, report_mode: str = "min") -> dict:
    """Train task `cfg` (lzn.task.TaskConfig) in `run_dir`, resuming from its latest
    checkpoint; rank 0 evaluates and returns the metrics (other ranks: the train summary).

    batch_source: None reads the train split into memory (batches a function of (seed,
    step)); else a callable that takes this rank's `StepBatcher` and returns `step -> batch`
    (the Ray Data stream). Evaluation needs the splits in memory: when they do not fit, the
    run says so and leaves evaluation to a separate stage. evaluate=False leaves it to the
    pipeline's evaluate stage (`pipelines.evaluate`) in any case. report_metric: a metrics.json
    key that rank 0 evaluates on the EMA model at every checkpoint and hands to the checkpoint
    store's report (a sweep's early-stopping signal).
    """
    from lzn.data.batches import StepBatcher, make_batches
    from lzn.data.reader import in_memory_problem, load_training_split
    from lzn.distributed import make_gather, rank, world_size
    from lzn.task import TWO_VIEW_OBJECTIVES, build_objective
    from lzn.trainer import Trainer

    meta = meta or RunMeta()
    run_dir = Path(run_dir)
    r, world = rank(), world_size()
    d = cfg.data
    two_view = cfg.objective in TWO_VIEW_OBJECTIVES
    split = None
    if batch_source is None or (r == 0 and evaluate):
        problem = in_memory_problem(d.dataset_dir, image_size=d.image_size, channels=d.channels)
        if batch_source is None or problem is None:
            split = load_training_split(d.dataset_dir, image_size=d.image_size, channels=d.channels)
        else:
            print(f"not evaluating in this run: {problem}; run `python -m pipelines.evaluate` on its checkpoint",
                  file=sys.stderr)
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    objective = build_objective(cfg, make_gather() if world > 1 else None).to(device)
    if batch_source is None:
        batches = make_batches(split.train_images, split.train_labels, global_batch=cfg.train.batch_size,
                               seed=cfg.train.seed, augment=d.augment, two_view=two_view, rank=r, world=world,
                               device=device)
    else:
        batches = batch_source(StepBatcher(global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                                           augment=d.augment, image_size=d.image_size, two_view=two_view,
                                           rank=r, world=world, device=device))
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks, tracker, jsonl, lock = [], None, None, None
    if r == 0:
        lock = _lock_run_folder(run_dir)
        jsonl = JsonlLogger(RunFolder(run_dir).train_log)
        callbacks.append(jsonl)
    timed = TimedCallbacks(callbacks)
    try:
        trainer = Trainer(objective, cfg.optim, cfg.train, batches, run_dir=run_dir,
                          callbacks=[timed] if r == 0 else [], device=device, checkpoints=checkpoints)
        if r == 0 and report_metric:
            checkpoints.report_metrics = _checkpoint_evaluation(cfg, trainer, device, run_dir, report_metric,
                                                                report_mode)
        if r == 0 and meta.tracking_uri:  # after everything that can refuse the config
            tracker = _open_tracker(cfg, run_dir, meta)
            if tracker is not None:
                callbacks.append(tracker)
        metrics = dict(trainer.fit())
        if r == 0:
            metrics["train/logging_seconds"] = timed.seconds
            _evaluate_and_report(cfg, trainer, split if evaluate else None, run_dir, device, meta, jsonl, tracker,
                                 metrics)
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")
        raise
    else:
        if tracker is not None:
            tracker.close("FINISHED")
    finally:
        if lock is not None:
            lock.close()  # releases the flock
    return metrics


def _checkpoint_evaluation(cfg, trainer, device, run_dir: Path, key: str, mode: str) -> Callable[[int], dict]:
    """step -> {tune_key(key): value, "report": checkpoint index} of the EMA model now: the
    metric alone, read from the shards, also appended to the run folder's checkpoint log. An
    evaluation that fails (NaN samples of a diverged trial) reports the worst value for `mode`
    instead of failing the run, so the scheduler stops the trial rather than Ray retrying it."""
    import math

    from lzn.eval_data import ShardData
    from lzn.evaluate import evaluate_here, metric_for_key
    from lzn.inference import LZNModel

    metric, d = metric_for_key(cfg, key), cfg.data
    data = ShardData(d.dataset_dir, image_size=d.image_size, channels=d.channels)

    def evaluate_now(step: int) -> dict:
        model = LZNModel(trainer.ema, (d.channels, d.image_size, d.image_size), device)
        try:
            with tempfile.TemporaryDirectory(prefix="lzn-eval-") as parts:
                value = float(evaluate_here(cfg, model, data, cache_dir=Path(cfg.output_dir) / ".cache",
                                            parts_dir=parts, chosen=[metric], progress=False)[key])
        except (ValueError, RuntimeError) as e:
            value = math.inf if mode == "min" else -math.inf
            print(f"[sweep] evaluating {key} at step {step} failed ({type(e).__name__}: {e}); reporting {value}",
                  file=sys.stderr, flush=True)
        record_checkpoint_metric(RunFolder(run_dir), step, key, value)
        return checkpoint_report(key, value, step, cfg.train)

    return evaluate_now


def _evaluate_and_report(cfg, trainer, split, run_dir: Path, device, meta: RunMeta, jsonl, tracker,
                         metrics: dict) -> None:
    """Add the evaluation to `metrics` (the training summary), write metrics.json and the
    plots, and send it all to MLflow with the final checkpoint and the registered model."""
    from lzn.eval_data import InMemoryData
    from lzn.evaluate import evaluate_here
    from lzn.inference import LZNModel
    from orchestration.plots import loss_curves, sample_grid, write_run_artifacts

    model = LZNModel(trainer.ema, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), device)
    run_folder = RunFolder(run_dir)
    folder = run_folder.artifacts
    if split is not None:
        with tempfile.TemporaryDirectory(prefix="lzn-eval-") as parts:
            metrics.update(evaluate_here(cfg, model, InMemoryData(split, cfg.data.dataset_dir),
                                         cache_dir=Path(cfg.output_dir) / ".cache", parts_dir=parts))
        pngs = write_run_artifacts(cfg, model, split, jsonl.rows(), folder)
    else:  # streamed data or a separate evaluate stage: no held-out images here for the zone map
        folder.mkdir(parents=True, exist_ok=True)
        rows = jsonl.rows()
        pngs = [p for p in (loss_curves(rows, folder / "loss_curves.png") if rows else None,
                            sample_grid(model, cfg, folder / "samples.png")) if p is not None]
    run_folder.write_metrics(metrics)
    if tracker is None:
        return
    tracker.log_metrics(metrics, step=trainer.step)
    for png in pngs:
        tracker.log_artifact(png, "plots")
    tracker.log_artifact(run_folder.metrics)
    if trainer.last_checkpoint is not None:
        tracker.log_artifact(trainer.last_checkpoint, "checkpoint")
    if meta.register_model:
        version = tracker.register_model(trainer.ema, f"lzn-{cfg.name}", meta.model_alias)
        if version is not None:
            print(f"registered model lzn-{cfg.name} version {version} as @{meta.model_alias}", file=sys.stderr)

