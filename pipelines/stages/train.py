"""The train stage: prepare the data if needed, then train (and, unless the DAG evaluates on
its own, evaluate) a run in its folder, on this process (or torchrun's) or on Ray Train. On
this process a train split that does not fit in memory (or data.loader=stream) streams from
the shards, each rank reading its part."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lzn.atomic import write_atomically
from lzn.data.augment import crops_any_size
from lzn.data.loader import ShardBatches
from lzn.errors import UserError
from orchestration.folder import RunFolder
from orchestration.network import node_identity, pick_for_master
from orchestration.run import (RunConfig, node_metrics, refused_changes, run_params, streams, train_and_evaluate,
                               validate_run)
from pipelines.cli import device as pick_device, run_meta
from pipelines.stages.prepare import check_trainable, ensure_prepared


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        pick_for_master()  # GLOO/NCCL_SOCKET_IFNAME: the interface towards MASTER_ADDR, where unset
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _refuse_existing(cfg: RunConfig, folder: RunFolder) -> None:
    if not cfg.resume and folder.has_checkpoints():
        raise UserError(f"{folder.path} already holds checkpoints and resume=false: "
                        "choose another run_name= or delete the folder")


def check_same_training(cfg: RunConfig, folder: RunFolder) -> None:
    """A run folder continues only the training it holds: settings that change what is trained
    (not how long, where or how it runs: `orchestration.run.refused_changes`) are refused, with
    or without MLflow."""
    params = run_params(cfg)
    record = folder.trained_with
    if folder.has_checkpoints() and record.is_file():
        refused = refused_changes(json.loads(record.read_text()), params)
        if refused:
            raise UserError(f"{folder.path} holds a model trained with other settings ({'; '.join(refused)}): "
                            "restore them, or choose another run_name= (or delete the folder) to train anew")
    write_atomically(record, lambda f: f.write(json.dumps(params, indent=1, sort_keys=True).encode() + b"\n"))


def shard_stream(cfg: RunConfig) -> Callable | None:
    """The `batch_source` of a train split that streams on this backend (data.loader=stream, or
    auto when it does not fit in memory): this rank's part of the shards through a DataLoader,
    images at full resolution for an augmentation that crops any size, else squared to
    data.image_size. None: the split is held in memory."""
    if not streams(cfg.data):
        return None
    d = cfg.data
    full_resolution = crops_any_size(d.augment)
    return lambda batcher: ShardBatches(d.dataset_dir, batcher, image_size=d.image_size, channels=d.channels,
                                        full_resolution=full_resolution, workers=d.loader_workers)


def train(cfg: RunConfig, run_dir: Path, dcfg: DictConfig, *, evaluate: bool = True) -> dict:
    """Prepare, train and (unless evaluate=False) evaluate `cfg` in `run_dir`; rank 0's metrics."""
    validate_run(cfg)
    folder = RunFolder(run_dir)
    _refuse_existing(cfg, folder)
    if int(os.environ.get("RANK", "0")) == 0:
        check_same_training(cfg, folder)
    if cfg.backend == "ray":
        from orchestration.ray.train import fit_on_ray

        ensure_prepared(cfg.data)  # on the driver, before any worker starts
        check_trainable(cfg)  # before the tracking server and Ray start
        return fit_on_ray(cfg, run_dir, run_meta(cfg, dcfg, run_dir), evaluate=evaluate)
    device = pick_device(cfg.device)
    owns_group = not dist.is_initialized()  # the stage DAG's group (pipelines.ranks) outlives this stage
    rank, world = _init_distributed(device)
    if world > 1:  # where each rank runs (hostname, pid, its node's address, Slurm's node name)
        record = RunFolder(run_dir).worker_record(rank)
        record.parent.mkdir(parents=True, exist_ok=True)
        info = json.dumps({**node_identity(), "rank": rank, "world": world}).encode()
        write_atomically(record, lambda f: f.write(info))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    meta = None
    if rank == 0:
        ensure_prepared(cfg.data)
        check_trainable(cfg)  # before the tracking server starts
        meta = run_meta(cfg, dcfg, run_dir)
    node_monitor = None
    if dist.is_initialized():
        # The other ranks read the shards rank 0 prepared, and learn where the run is tracked:
        # each node's local rank 0 samples its node's system metrics into rank 0's run.
        shared = [meta]
        dist.broadcast_object_list(shared, src=0)
        meta, node_monitor = node_metrics(shared[0], run_dir, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        metrics = train_and_evaluate(cfg, run_dir, device=device, meta=meta, evaluate=evaluate,
                                     batch_source=shard_stream(cfg))
    finally:
        if node_monitor is not None:
            node_monitor.stop()
    if dist.is_initialized():  # not on failure: the other ranks may sit in another collective
        dist.barrier()
        if owns_group:
            dist.destroy_process_group()
    return metrics
