"""The Ray Train backend: the same training loop on N Ray workers (gloo on CPU, NCCL on GPU).

`fit_on_ray` connects to $RAY_ADDRESS (an existing cluster) or starts a local Ray on
127.0.0.1, and runs `orchestration.run.train_and_evaluate` on every worker of a
`TorchTrainer`. Ray Train owns the process group (rank, world size), the checkpoints
(reported every `train.checkpoint_every` steps into <run_dir>/ray/ckpt-<step>/) and fault
tolerance: a worker that dies restarts the group from the last checkpoint
(`max_failures` times), and re-running the same command after the driver died restores
the run from the same storage. A lost node (`orchestration.ray.node_loss`): an elastic run
(`trainer.min_workers`) goes on with the workers that remain, a fixed-size one waits for
them at most `trainer.node_wait_s`. Each worker writes <run_dir>/workers/rank-<r>.json (pid,
node) so an operator can find it. On a multi-node cluster the run folder and the shards
must live on storage every node mounts at the same path.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lzn import seeds
from lzn.atomic import write_atomically
from lzn.checkpoint import load_checkpoint
from lzn.errors import UserError
from orchestration.folder import RAY_CHECKPOINT_FILE, RAY_STORAGE, RunFolder
from orchestration.network import node_identity
from orchestration.ray.backend import LznTorchConfig
from orchestration.ray.console import quiet_local_ray, quiet_train_worker, worker_progress
from orchestration.ray.node_loss import NodeWatch, scaling_workers, start_tries
from orchestration.reporting import STEP, final_report, finished_result
from orchestration.run import RayTrainerConfig, RunConfig, RunMeta, node_metrics, streams, train_and_evaluate


class RayCheckpoints:
    """lzn's CheckpointStore on Ray Train: `ray.train.report` persists rank 0's checkpoint
    into the run's storage; `ray.train.get_checkpoint` hands the latest to a restarted run."""

    def __init__(self, run_folder: RunFolder):
        self.run_folder = run_folder
        # step -> extra metrics for the report (a sweep's metric), called on every rank at each
        # save (its evaluation is sharded over the ranks); rank 0's result is reported, the others' None.
        self.report_metrics = None

    def latest(self, map_location="cpu") -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / RAY_CHECKPOINT_FILE, map_location=map_location)

    def latest_path(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else Path(checkpoint.path) / RAY_CHECKPOINT_FILE

    def save(self, state: dict, step: int, rank: int) -> Path | None:
        import ray.train

        name = RunFolder.ray_checkpoint_name(step)
        extra = self.report_metrics(step) if self.report_metrics else None
        if rank != 0:  # report is a barrier: every rank calls it, only rank 0 brings a checkpoint
            ray.train.report({STEP: step})
            return None
        metrics = {STEP: step, **(extra or {})}
        with tempfile.TemporaryDirectory(prefix="lzn-ckpt-") as folder:
            torch.save(state, Path(folder) / RAY_CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        return self.run_folder.ray_checkpoint(name)


class _Ragged:
    """A batch of images of several sizes, (C, H_i, W_i) uint8 each, and labels (B,): not a
    tensor batch, so Ray Data hands it over as it is (it would concatenate the images)."""

    def __init__(self, images: list[torch.Tensor], labels: torch.Tensor):
        self.images, self.labels = images, labels


def _uint8_rows(pin: bool):
    """Ray Data's collate for the stream: numpy rows -> uint8 tensors (B, C, H, W), on Ray's
    prefetch threads. One size: a tensor batch, which Ray pins and moves to the device; mixed
    sizes (full resolution, for a cropping augmentation): `_Ragged`, pinned here."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Uint8Rows(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]):
            pixels, labels = batch["image"], torch.from_numpy(batch["label"].astype(np.int64))
            if pixels.dtype == object and len({p.shape for p in pixels}) == 1:  # one size, as objects
                pixels = np.stack(list(pixels))
            if pixels.dtype != object:  # (B, H, W, C) -> (B, C, H, W): one copy, here rather than on the device
                return {"image": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), "label": labels}
            images = [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1))) for p in pixels]
            if pin:
                images, labels = [x.pin_memory() for x in images], labels.pin_memory()
            return _Ragged(images, labels)

    return Uint8Rows()


class StreamedBatches:
    """`step -> batch` from this worker's Ray Data shard of the train split (data.loader=stream).

    The shard is this worker's part of `orchestration.ray.data.stream_passes`: every pass the
    run needs, one after the other, in ONE Ray Data execution that this class iterates from
    the first step to the last (a new execution per pass costs 1-2 s of start-up, which on a
    small dataset is many steps). Ray Train splits the stream evenly over the workers
    (equal=True), so every worker has the same number of steps; within a pass each worker
    reads rows no other worker reads, and rows are shuffled within a local buffer seeded by
    (seed, rank) (seeds.stream_shuffle, pass_index = the execution), whose `SHUFFLE_BUFFER`
    rows may straddle the end of one pass and the start of the next. Rows arrive as uint8
    tensors, `PREFETCH` batches ahead, collated (and on CUDA pinned and copied to the device)
    by Ray Data's threads; `StepBatcher` converts and augments them on the device. Unlike the
    in-memory loader the order is not a function of (seed, step): a resumed run starts the
    stream again, and W workers do not see the batches of 1. Should the stream end before
    the run (more steps than planned), a new execution starts (`executions` counts them).
    """

    SHUFFLE_BUFFER = 2048
    PREFETCH = 2

    def __init__(self, shard, batcher, *, seed: int):
        self.shard, self.batcher, self.seed = shard, batcher, seed
        self.executions, self._rows = 0, None
        self.device = torch.device(batcher.device)

    def _next_rows(self):
        for _ in range(2):  # the rest of the stream, else a fresh execution of it
            if self._rows is None:
                cuda = self.device.type == "cuda"
                self._rows = iter(self.shard.iter_torch_batches(
                    batch_size=self.batcher.local_batch, drop_last=True, prefetch_batches=self.PREFETCH,
                    collate_fn=_uint8_rows(pin=cuda), pin_memory=cuda, device=self.device,
                    local_shuffle_buffer_size=self.SHUFFLE_BUFFER,
                    local_shuffle_seed=seeds.stream_shuffle(self.seed, self.executions, self.batcher.rank)))
                self.executions += 1
            rows = next(self._rows, None)
            if rows is not None:
                return rows
            self._rows = None
        raise UserError(f"this worker's shard of the stream holds no full batch of {self.batcher.local_batch} "
                        "rows: lower train.batch_size or use fewer workers")

    def __call__(self, step: int) -> dict:
        rows = self._next_rows()
        # Full-resolution images of mixed sizes go to the batcher one by one: its augmentation
        # crops each to the task's size before the batch is stacked.
        if isinstance(rows, _Ragged):
            return self.batcher(rows.images, rows.labels, step)
        return self.batcher(rows["image"], rows["label"], step)

    def close(self) -> None:
        self._rows = None  # Ray Data's prefetch threads end with the iterator


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    cfg, run_dir, trainer_cfg = config["cfg"], Path(config["run_dir"]), config["trainer"]
    torch.set_num_threads(max(1, round(trainer_cfg.cpus_per_worker)))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    folder = RunFolder(run_dir)
    folder.workers.mkdir(parents=True, exist_ok=True)
    # Where it runs: hostname, pid, Ray node IP and id (on a cluster the hostname alone can be the same on all).
    info = {**node_identity(), "rank": rank, "world": context.get_world_size()}
    write_atomically(folder.worker_record(rank), lambda f: f.write(json.dumps(info).encode()))
    if rank == 0:  # an elastic restart on fewer workers: the records name this attempt's workers only
        for r in range(context.get_world_size(), 1 << 16):
            if not folder.worker_record(r).exists():
                break
            folder.worker_record(r).unlink(missing_ok=True)
    device = ray.train.torch.get_device() if trainer_cfg.use_gpu else torch.device("cpu")
    source = None
    if config["stream"]:
        shard = ray.train.get_dataset_shard("train")
        source = lambda batcher: StreamedBatches(shard, batcher, seed=cfg.train.seed)  # noqa: E731
    checkpoints = RayCheckpoints(folder)
    key = config.get("report_metric")
    meta, node_monitor = node_metrics(config["meta"], run_dir, context.get_local_rank())
    try:
        metrics = train_and_evaluate(cfg, run_dir, device=device, meta=meta, checkpoints=checkpoints,
                                     batch_source=source, evaluate=config.get("evaluate", True), report_metric=key,
                                     report_mode=config.get("report_mode", "min"),
                                     progress=worker_progress(config.get("progress", True)))
    finally:
        if node_monitor is not None:
            node_monitor.stop()
    if key:  # a sweep's last result, once the run is evaluated and recorded (a scheduler may end it here)
        value = None
        if rank == 0:  # the run's evaluation, else (streamed data: none in the run) the last checkpoint's
            value = metrics.get(key)
            if value is None:
                found = finished_result(run_dir, key, cfg.train.iterations)
                value = None if found is None else found[1]
        ray.train.report(final_report(metrics["train/steps"], cfg.train, key, value))


def init_ray() -> bool:
    """Connect to $RAY_ADDRESS or start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # the dashboard serves the state API that Ray Train's controller polls
        quiet_local_ray()
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Ray Train runs workers in their own working directory: ship absolute paths."""
    cfg = copy.deepcopy(cfg)
    cfg.data.shards_dir = str(Path(cfg.data.shards_dir).resolve())
    if cfg.eval.inception_weights:
        cfg.eval.inception_weights = str(Path(cfg.eval.inception_weights).expanduser().resolve())
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    return cfg


def check_cpus(trainer_cfg: RayTrainerConfig, have: float, stream: bool, autoscaling: bool) -> None:
    """Fail before scheduling anything that would wait forever: workers that do not fit, or
    Ray Data's read tasks left without a CPU next to the workers (a silent deadlock)."""
    needed = trainer_cfg.num_workers * trainer_cfg.cpus_per_worker
    what = f"trainer.num_workers={trainer_cfg.num_workers} x trainer.cpus_per_worker={trainer_cfg.cpus_per_worker:g}"
    if needed > have and not autoscaling:
        raise UserError(f"{what} needs {needed:g} CPUs; this Ray has {have:g}")
    if stream and have - needed < 1 and not autoscaling:
        raise UserError(f"data.loader=stream reads with Ray Data tasks, which need at least 1 CPU beside the "
                        f"workers: {what} takes {needed:g} of this Ray's {have:g}. Lower trainer.cpus_per_worker "
                        f"(fractions work, e.g. {max(0.25, (have - 1) / trainer_cfg.num_workers):g}) or num_workers")


def fit_on_ray(cfg: RunConfig, run_dir: str | Path, meta: RunMeta | None, *,
               evaluate: bool = True, report_metric: str | None = None, report_mode: str = "min",
               callbacks: list | None = None, progress: bool = True) -> dict:
    """Train and evaluate the run `cfg` (checked by `validate_run`) on Ray workers; returns rank 0's metrics.json
    (evaluate=False: training only, the evaluation is a later stage). report_metric: a
    metrics.json key evaluated at every checkpoint and reported with it (as `tune_key`), for
    a Tune scheduler that `callbacks` (TuneReportCallback) feeds. progress: rank 0's bars
    (orchestration.ray.console; False: none, as in a sweep's trials)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer_cfg = cfg.trainer
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = init_ray()
    try:
        stream, datasets = streams(cfg.data), {}
        check_cpus(trainer_cfg, ray.cluster_resources().get("CPU", 0), stream,
                    autoscaling=bool(os.environ.get("RAY_ADDRESS")))
        if stream:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per worker line
            from orchestration.ray.data import stream_passes

            from lzn.data.augment import crops_any_size

            datasets["train"] = stream_passes(  # every pass of the run in one execution
                cfg.data.dataset_dir, "train", seed=cfg.train.seed, steps=cfg.train.iterations,
                global_batch=cfg.train.batch_size, image_size=cfg.data.image_size, channels=cfg.data.channels,
                full_resolution=crops_any_size(cfg.data.augment))
        trainer = TorchTrainer(
            _worker_loop,
            torch_config=LznTorchConfig(),  # GLOO/NCCL_SOCKET_IFNAME from each worker's Ray node IP
            train_loop_config={"cfg": absolute_paths(cfg), "run_dir": str(run_dir), "trainer": trainer_cfg,
                               "meta": meta, "stream": stream, "evaluate": evaluate,
                               "report_metric": report_metric, "report_mode": report_mode,
                               "progress": progress},
            datasets=datasets or None,
            scaling_config=ray.train.ScalingConfig(
                num_workers=scaling_workers(trainer_cfg), use_gpu=trainer_cfg.use_gpu,
                resources_per_worker={"CPU": trainer_cfg.cpus_per_worker,
                                      **({"GPU": 1} if trainer_cfg.use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name=RAY_STORAGE, storage_path=str(run_dir),
                failure_config=ray.train.FailureConfig(max_failures=trainer_cfg.max_failures,
                                                       controller_failure_limit=start_tries(trainer_cfg)),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"), callbacks=callbacks or None),
        )
        with NodeWatch(trainer_cfg) as watch:
            try:
                trainer.fit()
            except Exception as e:
                if (failure := watch.failure(e)) is not None:
                    raise failure from e
                raise
    finally:
        if started:
            ray.shutdown()
    metrics = RunFolder(run_dir).read_metrics()
    if metrics is None:  # rank 0 writes it last: a run that returns without it did not finish
        raise RuntimeError(f"the Ray Train run in {run_dir} ended without writing {RunFolder(run_dir).metrics}")
    return metrics
