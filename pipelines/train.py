"""`python -m pipelines.train task=<name> [scale=smoke] [backend=local|ray] [key=value ...]`:
prepare the data if needed, train, evaluate, write metrics.json in the run's folder, log
the run to MLflow, and name the folder on the last line.

backend=local runs in this process, or under torchrun (rank and world size from the
environment); backend=ray runs the same loop on `trainer.num_workers` Ray Train workers
($RAY_ADDRESS, or a local Ray). The run folder is outputs/<task>/<scale>-seed<seed> unless
`run_name=` says otherwise; re-running the same command resumes from its latest checkpoint
and continues the same MLflow run. Tracking: $MLFLOW_TRACKING_URI, or `tracking.uri=`, or a
local MLflow server under <output_dir>/mlflow that the first run starts (`tracking.enabled=false`
turns tracking off).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from orchestration.folder import RunFolder
from pipelines.config import BACKENDS, RunConfig, register, to_run_config

register()


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


def git_commit() -> str:
    """HEAD of this checkout (-dirty with uncommitted changes); a Ray job's uploaded copy has
    no .git, so `pipelines.submit` sends the submitter's commit as $LZN_GIT_COMMIT."""
    if os.environ.get("LZN_GIT_COMMIT"):
        return os.environ["LZN_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def _remote(address: str | None) -> bool:
    """A Ray address on another machine (not auto, local or a 127.0.0.1/localhost one)."""
    if not address or address in ("auto", "local"):
        return False
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host not in ("127.0.0.1", "localhost", socket.gethostname())


def _entry_point() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("pipelines.") else "pipelines.train"


def run_meta(cfg: RunConfig, dcfg: DictConfig, run_dir: Path):
    """Where and as what the run is tracked; starts the local MLflow server when needed."""
    from orchestration.mlflow.runs import check_resumable
    from orchestration.mlflow.tracker import flatten_params, resolve_tracking_uri
    from orchestration.run import RunMeta

    t = cfg.tracking
    commit = git_commit()
    if t.enabled and cfg.backend == "ray" and _remote(os.environ.get("RAY_ADDRESS")) \
            and not (t.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ValueError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is a cluster whose workers cannot reach a "
                         "tracking server on this machine's 127.0.0.1: set MLFLOW_TRACKING_URI (or tracking.uri=) "
                         "to a server they can reach (infra/mlflow/), or tracking.enabled=false")
    uri = resolve_tracking_uri(t, cfg.output_dir) if t.enabled else None
    if uri:
        check_resumable(uri, run_dir, flatten_params(dataclasses.asdict(cfg)))
    return RunMeta(
        tracking_uri=uri,
        experiment=t.experiment or cfg.name,
        run_name=f"{cfg.run_name}",
        config_yaml=OmegaConf.to_yaml(dcfg, resolve=True),
        tags={"mlflow.source.git.commit": commit, "lzn.git_commit": commit,
              "lzn.command": shlex.join([sys.executable, "-m", _entry_point(), *sys.argv[1:]]),
              "lzn.task": cfg.name, "lzn.scale": cfg.scale, "lzn.backend": cfg.backend,
              "lzn.run_dir": str(run_dir.resolve())},
        system_metrics=t.system_metrics, system_metrics_every_s=t.system_metrics_every_s,
        flush_every_s=t.flush_every_s,
        register_model=t.register_model, model_alias=t.model_alias, open_timeout_s=t.open_timeout_s)


def _refuse_existing(cfg: RunConfig, run_dir: Path) -> None:
    if not cfg.resume and RunFolder(run_dir).has_checkpoints():
        raise SystemExit(f"{run_dir} already holds checkpoints and resume=false: "
                         "choose another run_name= or delete the folder")


def check_same_training(cfg: RunConfig, run_dir: Path) -> None:
    """A run folder continues only the training it holds: settings that change what is trained
    (not how long, where or how it runs: RESUMABLE_PARAMS) are refused, with or without MLflow."""
    from lzn.atomic import write_atomically
    from orchestration.mlflow.runs import resumable
    from orchestration.mlflow.tracker import flatten_params

    folder = RunFolder(run_dir)
    params = flatten_params(dataclasses.asdict(cfg))
    record = folder.trained_with
    if folder.has_checkpoints() and record.is_file():
        old = json.loads(record.read_text())
        refused = [f"{k}: {old[k]!r} -> {v!r}" for k, v in params.items() if k in old and old[k] != v
                   and not resumable(k)]
        if refused:
            raise ValueError(f"{run_dir} holds a model trained with other settings ({'; '.join(refused)}): restore "
                             "them, or choose another run_name= (or delete the folder) to train anew")
    write_atomically(record, lambda f: f.write(json.dumps(params, indent=1, sort_keys=True).encode() + b"\n"))


def run(cfg: RunConfig, run_dir: Path, dcfg: DictConfig, *, evaluate: bool = True) -> dict:
    """Prepare, train and (unless evaluate=False) evaluate `cfg` in `run_dir`; rank 0's metrics."""
    from lzn.task import validate_task
    from orchestration.run import train_and_evaluate
    from pipelines.prepare import ensure_prepared

    validate_task(cfg)
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend={cfg.backend!r} is not known; expected one of {list(BACKENDS)}")
    _refuse_existing(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        check_same_training(cfg, run_dir)
    if cfg.backend == "ray":
        from orchestration.ray.train import fit_on_ray, validate_trainer

        validate_trainer(cfg.trainer, cfg.train.batch_size)
        ensure_prepared(cfg.data)  # on the driver, before any worker starts
        return fit_on_ray(cfg, run_dir, cfg.trainer, run_meta(cfg, dcfg, run_dir), evaluate=evaluate)
    device = _device(cfg.device)
    rank, _ = _init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    meta = None
    if rank == 0:
        ensure_prepared(cfg.data)
        meta = run_meta(cfg, dcfg, run_dir)
    if dist.is_initialized():
        dist.barrier()  # the other ranks read the shards rank 0 prepared
    metrics = train_and_evaluate(cfg, run_dir, device=device, meta=meta, evaluate=evaluate)
    if dist.is_initialized():  # not on failure: the other ranks may sit in another collective
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
        metrics = run(cfg, run_dir, dcfg)
    except (SourceError, ShardError, ValueError) as e:  # bad data or settings: say so, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the whole story
            raise
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        width = max(len(k) for k in metrics)
        for key in sorted(metrics):
            print(f"{key:<{width}}  {metrics[key]:.6g}" if isinstance(metrics[key], float)
                  else f"{key:<{width}}  {metrics[key]}")
        print(f"run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
