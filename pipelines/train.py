"""`python -m pipelines.train task=<name> [scale=smoke] [key=value ...]`: train, evaluate,
write metrics.json in the run's folder, and name that folder on the last line.

Runs single-process or under torchrun (rank and world size from the environment). The
run folder is outputs/<task>/<scale>-seed<seed> unless `run_name=` says otherwise;
re-running the same command resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from pipelines.config import RunConfig, register, to_run_config

register()


class JsonlLogger:
    """Training metrics as JSON lines in the run folder (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run(cfg: RunConfig, run_dir: Path) -> dict[str, float]:
    from lzn.data.batches import make_batches
    from lzn.data.reader import load_training_split
    from lzn.distributed import make_gather
    from lzn.evaluate import evaluate
    from lzn.inference import LZNModel
    from lzn.task import TWO_VIEW_OBJECTIVES, build_objective, validate_task
    from lzn.trainer import Trainer

    validate_task(cfg)
    device = _device(cfg.device)
    rank, world = _init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        from pipelines.prepare import ensure_prepared

        ensure_prepared(cfg.data)
    if dist.is_initialized():
        dist.barrier()  # the other ranks read the shards rank 0 prepared
    split = load_training_split(cfg.data.dataset_dir, image_size=cfg.data.image_size, channels=cfg.data.channels)
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    objective = build_objective(cfg, make_gather() if world > 1 else None).to(device)
    batches = make_batches(split.train_images, split.train_labels, global_batch=cfg.train.batch_size,
                           seed=cfg.train.seed, augment=cfg.data.augment,
                           two_view=cfg.objective in TWO_VIEW_OBJECTIVES, rank=rank, world=world,
                           device=device)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [JsonlLogger(run_dir / "train_metrics.jsonl")] if rank == 0 else []
    trainer = Trainer(objective, cfg.optim, cfg.train, batches, run_dir=run_dir, callbacks=callbacks,
                      device=device)
    if not cfg.resume:
        from lzn.checkpoint import latest_checkpoint

        if latest_checkpoint(trainer.ckpt_dir) is not None:
            raise SystemExit(f"{run_dir} already holds checkpoints and resume=false: "
                             "choose another run_name= or delete the folder")
    summary = trainer.fit()
    metrics = dict(summary)
    if rank == 0:
        model = LZNModel(trainer.ema, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), device)
        metrics.update(evaluate(cfg, model, split, cache_dir=Path(cfg.output_dir) / ".cache"))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from lzn.data.shards import ShardError
    from lzn.data.sources import SourceError

    cfg = to_run_config(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except (SourceError, ShardError) as e:  # the data is missing or unusable: say so, no traceback
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        width = max(len(k) for k in metrics)
        for key in sorted(metrics):
            print(f"{key:<{width}}  {metrics[key]:.6g}" if isinstance(metrics[key], float)
                  else f"{key:<{width}}  {metrics[key]}")
        print(f"run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
