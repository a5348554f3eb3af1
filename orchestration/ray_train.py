"""The Ray Train backend: the same training loop on N Ray workers (gloo on CPU, NCCL on GPU).

`fit_on_ray` connects to $RAY_ADDRESS (an existing cluster) or starts a local Ray on
127.0.0.1, and runs `orchestration.training.train_and_evaluate` on every worker of a
`TorchTrainer`. Ray Train owns the process group (rank, world size), the checkpoints
(reported every `train.checkpoint_every` steps into <run_dir>/ray/ckpt-<step>/) and fault
tolerance: a worker that dies restarts the group from the last checkpoint
(`max_failures` times), and re-running the same command after the driver died restores
the run from the same storage. Each worker writes <run_dir>/workers/rank-<r>.json (pid,
node) so an operator can find it. On a multi-node cluster the run folder and the shards
must live on storage every node mounts at the same path.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lzn.atomic import write_atomically
from lzn.checkpoint import load_checkpoint
from orchestration.training import RunMeta, train_and_evaluate

STORAGE_NAME = "ray"  # Ray Train's run folder inside the run folder
CHECKPOINT_FILE = "ckpt.pt"


@dataclass
class RayTrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1  # also the torch thread count of each worker
    max_failures: int = 3  # worker failures a run recovers from (each restarts from the last checkpoint)


def validate_trainer(cfg: RayTrainerConfig, global_batch: int) -> None:
    if cfg.num_workers < 1:
        raise ValueError(f"trainer.num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.cpus_per_worker < 1:
        raise ValueError(f"trainer.cpus_per_worker must be >= 1, got {cfg.cpus_per_worker}")
    if global_batch % cfg.num_workers:
        raise ValueError(f"train.batch_size={global_batch} is the global batch: it must be divisible by "
                         f"trainer.num_workers={cfg.num_workers}")


class RayCheckpoints:
    """lzn's CheckpointStore on Ray Train: `ray.train.report` persists rank 0's checkpoint
    into the run's storage; `ray.train.get_checkpoint` hands the latest to a restarted run."""

    def __init__(self, storage_dir: Path):
        self.storage_dir = Path(storage_dir)

    def latest(self, map_location="cpu") -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE, map_location=map_location)

    def save(self, state: dict, step: int, rank: int) -> Path | None:
        import ray.train

        name = f"ckpt-{step:09d}"
        if rank != 0:  # report is a barrier: every rank calls it, only rank 0 brings a checkpoint
            ray.train.report({"step": step})
            return None
        with tempfile.TemporaryDirectory(prefix="lzn-ckpt-") as folder:
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        return self.storage_dir / name / CHECKPOINT_FILE


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg, run_dir, trainer_cfg = config["cfg"], Path(config["run_dir"]), config["trainer"]
    torch.set_num_threads(trainer_cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    workers = run_dir / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "node": socket.gethostname(), "rank": rank, "world": context.get_world_size()}
    write_atomically(workers / f"rank-{rank}.json", lambda f: f.write(json.dumps(info).encode()))
    device = ray.train.torch.get_device() if trainer_cfg.use_gpu else torch.device("cpu")
    train_and_evaluate(cfg, run_dir, device=device, meta=config["meta"],
                       checkpoints=RayCheckpoints(run_dir / STORAGE_NAME))


def _init_ray() -> bool:
    """Connect to $RAY_ADDRESS or start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # the dashboard serves the state API that Ray Train's controller polls
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def _absolute_paths(cfg):
    """Ray Train runs workers in their own working directory: ship absolute paths."""
    cfg = copy.deepcopy(cfg)
    cfg.data.shards_dir = str(Path(cfg.data.shards_dir).resolve())
    if hasattr(cfg, "output_dir"):
        cfg.output_dir = str(Path(cfg.output_dir).resolve())
    return cfg


def has_ray_checkpoints(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / STORAGE_NAME).glob("ckpt-*"))


def fit_on_ray(cfg, run_dir: str | Path, trainer_cfg: RayTrainerConfig, meta: RunMeta) -> dict:
    """Train and evaluate task `cfg` on Ray workers; returns rank 0's metrics.json."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    validate_trainer(trainer_cfg, cfg.train.batch_size)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = _init_ray()
    try:
        needed = trainer_cfg.num_workers * trainer_cfg.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if needed > have and not os.environ.get("RAY_ADDRESS"):
            raise ValueError(f"trainer.num_workers={trainer_cfg.num_workers} x trainer.cpus_per_worker="
                             f"{trainer_cfg.cpus_per_worker} needs {needed} CPUs; this Ray has {have:g}")
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"cfg": _absolute_paths(cfg), "run_dir": str(run_dir), "trainer": trainer_cfg, "meta": meta},
            scaling_config=ray.train.ScalingConfig(
                num_workers=trainer_cfg.num_workers, use_gpu=trainer_cfg.use_gpu,
                resources_per_worker={"CPU": trainer_cfg.cpus_per_worker,
                                      **({"GPU": 1} if trainer_cfg.use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name=STORAGE_NAME, storage_path=str(run_dir),
                failure_config=ray.train.FailureConfig(max_failures=trainer_cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return json.loads((run_dir / "metrics.json").read_text())
