"""The evaluation stage: which checkpoint (`resolve_target`), with which config (the training
run's, `with_training_config`), evaluated where (`evaluate_checkpoint`: here or on Ray actors)
and recorded where (the evaluation's folder, the run's metrics.json, MLflow). See
`pipelines.evaluate` for the command."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lzn.data.shards import sha256_file
from lzn.errors import UserError
from lzn.roles import Role
from orchestration.folder import CONFIG_FILE, EvalFolder, RunFolder, checkpoint_step
from orchestration.run import BACKENDS, RUN_ROLES, run_params
from pipelines.cli import device
from pipelines.config import DATA_EVAL_KEYS, EVAL_KEYS, EvalRun, to_run_config
from pipelines.stages.prepare import ensure_prepared


@dataclass
class Target:
    """What is evaluated: a checkpoint file, and the run it belongs to (if known)."""

    checkpoint: Path
    step: int = 0
    run_dir: Optional[Path] = None
    run_id: Optional[str] = None  # the MLflow run that trained it
    train_config: Optional[dict] = None  # the training run's resolved config
    notes: list[str] = field(default_factory=list)


def _from_folder(run_dir: Path, checkpoint: Path | None = None) -> Target:
    folder = RunFolder(run_dir)
    checkpoint = checkpoint or folder.latest_checkpoint()
    if checkpoint is None:
        raise UserError(f"checkpoint={run_dir} is a folder without checkpoints (checkpoints/ckpt-*.pt or "
                        "ray/ckpt-*/ckpt.pt)")
    target = Target(checkpoint.resolve(), run_dir=run_dir.resolve())
    target.run_id = folder.mlflow_run_id()
    if folder.hydra_config.is_file():
        target.train_config = OmegaConf.to_container(OmegaConf.load(folder.hydra_config))
    return target


def _from_mlflow(run_id: str, uri: str, cache: Path) -> Target:
    import mlflow
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    local = run.data.tags.get("lzn.run_dir")
    if local and Path(local).is_dir() and RunFolder(local).latest_checkpoint() is not None:
        target = _from_folder(Path(local))
        target.run_id = run_id
        return target
    dst = cache / run_id
    dst.mkdir(parents=True, exist_ok=True)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dst),
                                                      tracking_uri=uri))
    files = sorted(folder.rglob("*.pt") if folder.is_dir() else [folder], key=checkpoint_step)
    if not files:
        raise UserError(f"MLflow run {run_id} on {uri} logged no checkpoint (artifact checkpoint/)")
    target = Target(files[-1], run_id=run_id)
    config = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_FILE, dst_path=str(dst),
                                                      tracking_uri=uri))
    target.train_config = OmegaConf.to_container(OmegaConf.load(config))
    target.notes.append(f"checkpoint and config of MLflow run {run_id} downloaded to {dst}")
    return target


def resolve_target(arg: str | None, cfg: EvalRun) -> Target:
    """The checkpoint that `checkpoint=` names (see the module doc)."""
    if not arg:
        raise UserError("checkpoint= is required: a checkpoint file, a run folder, or an MLflow run id")
    path = Path(arg).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        run_folder = RunFolder.of_checkpoint(path.resolve())
        return _from_folder(run_folder.path, path) if run_folder else Target(path.resolve())
    if re.fullmatch(r"[0-9a-f]{32}", arg):
        from orchestration.mlflow.tracker import resolve_tracking_uri

        if not cfg.tracking.enabled:
            raise UserError(f"checkpoint={arg} looks like an MLflow run id, but tracking.enabled=false")
        uri = resolve_tracking_uri(cfg.tracking, cfg.output_dir)
        return _from_mlflow(arg, uri, Path(cfg.output_dir) / ".cache" / "mlflow-runs")
    raise UserError(f"checkpoint={arg!r} is neither a checkpoint file, a run folder, nor an MLflow run id "
                    "(32 hex digits)")


def with_training_config(dcfg: DictConfig, target: Target) -> EvalRun:
    """The command line's config with the training run's settings for everything the command
    line does not decide (EVAL_KEYS): the model evaluated is the model that was trained."""
    cli = to_run_config(dcfg)
    if target.train_config is None:
        return cli
    trained = {k: v for k, v in target.train_config.items() if k not in EVAL_KEYS}
    trained["data"] = {k: v for k, v in trained.get("data", {}).items() if k not in DATA_EVAL_KEYS}
    if trained.get("name", cli.name) != cli.name:
        raise UserError(f"checkpoint {target.checkpoint} was trained on task {trained['name']!r}, not "
                        f"task={cli.name!r}: pass task={trained['name']}")
    try:
        merged = OmegaConf.merge(dcfg, trained)
    except OmegaConfBaseException as e:  # a training config this schema no longer takes
        raise UserError(f"the training config of {target.checkpoint} does not load as task={cli.name}: {e}") from None
    cfg = to_run_config(merged)
    before, after = run_params(cli), run_params(cfg)
    changed = [f"{k}={after[k]} (command line: {before.get(k)})" for k in sorted(after) if before.get(k) != after[k]]
    if changed:
        target.notes.append("using the checkpoint's training config for " + ", ".join(changed[:12])
                            + (f" and {len(changed) - 12} more" if len(changed) > 12 else ""))
    return cfg


# What an evaluation's numbers depend on besides the weights and the data: the task, the
# model's definition and inference, the evaluation's settings (not how the weights were found,
# how long, where or how it ran).
RESULT_ROLES = (Role.TASK, Role.MODEL, Role.EVALUATION)


def extractor_digest(cfg, chosen: list[str]) -> str | None:
    """Which feature extractor / classifier the metrics read, by content; None if none."""
    if not {"fid", "conditional"} & set(chosen):
        return None
    if cfg.eval.fid_features == "inception":
        from lzn.metrics.fid import inception_weights_path

        return sha256_file(inception_weights_path(cfg.eval.inception_weights))  # fails early when missing
    if cfg.eval.fid_features == "pixels":
        from lzn.metrics.pixel_features import PIXELS_NAME, THUMBNAIL

        return f"{PIXELS_NAME}:{THUMBNAIL}"
    from lzn.metrics.digits_classifier import cache_key

    return f"digits_cnn:{cache_key()}"


def evaluation_key(cfg, chosen: list[str], checkpoint_sha: str) -> str:
    """What an evaluation's result depends on: the weights, the data, the settings, the extractor."""
    from lzn.data.shards import dataset_checksum

    params = run_params(cfg)
    settings = {k: params[k] for k in RUN_ROLES.keys(params, RESULT_ROLES)}
    parts = {"checkpoint": checkpoint_sha, "manifest": dataset_checksum(cfg.data.dataset_dir), "metrics": chosen,
             "settings": settings, "extractor": extractor_digest(cfg, chosen)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _plots(cfg, model, data, target: Target, folder: Path) -> list[Path]:
    from lzn.data.reader import ImageSplit
    from orchestration.plots import write_run_artifacts
    from orchestration.run import JsonlLogger

    n = min(cfg.eval.batch_size, data.size("test"))
    test_images, test_labels = data.rows("test", 0, n)
    split = ImageSplit(test_images[:0], test_labels[:0], test_images, test_labels)
    rows = JsonlLogger(RunFolder(target.run_dir).train_log).rows() if target.run_dir else []
    return write_run_artifacts(cfg, model, split, rows, folder)


def evaluate_checkpoint(cfg: EvalRun, target: Target, *, progress: bool = True) -> tuple[dict | None, Path]:
    """Evaluate `target` as `cfg` says; returns (metrics, the evaluation's folder). An
    evaluation already complete in its folder is not computed again, only recorded where it
    is missing (the run's metrics.json, MLflow).

    In a torch.distributed process group (the stage DAG under torchrun or Slurm DDP tasks) every
    rank calls it: the units are sharded over the ranks (`evaluate_on_ranks`, which rank
    computed each in parts/ranks.json), rank 0 alone prepares, writes and records, and returns
    the metrics; the other ranks return None for them."""
    from lzn.eval_data import ShardData
    from lzn.evaluate import evaluate_here, evaluate_on_ranks, load_model, select_metrics
    from orchestration.folder import write_json
    from orchestration.ray.evaluate import eval_settings, evaluate_on_ray
    from pipelines.ranks import Ranks

    if cfg.backend not in BACKENDS:
        raise UserError(f"backend={cfg.backend!r} is not known; expected one of {list(BACKENDS)}")
    ranks = Ranks()
    chosen = select_metrics(cfg, cfg.metrics)
    ranks.on_lead("preparing the data", lambda: ensure_prepared(cfg.data))
    error = None
    try:
        model, target.step = load_model(cfg, target.checkpoint, device(cfg.device))
        sha = sha256_file(target.checkpoint)
        key = evaluation_key(cfg, chosen, sha)
        run_folder = RunFolder(target.run_dir if target.run_dir else Path(cfg.output_dir) / cfg.name)
        folder = run_folder.evaluation(target.step, key[:12])
        folder.path.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - raised on every rank by settle
        error = e
    ranks.settle("loading the checkpoint", error)
    if ranks.agree("whether the evaluation is complete",
                   lambda: folder.complete.is_file() and folder.metrics.is_file()):
        if ranks.lead:
            print(f"{folder.path} already holds this evaluation (same checkpoint, data and settings)", file=sys.stderr)
    else:
        cache_dir = Path(cfg.output_dir) / ".cache"
        data = ShardData(cfg.data.dataset_dir, image_size=cfg.data.image_size, channels=cfg.data.channels)
        if cfg.backend == "ray":
            result = evaluate_on_ray(cfg, target.checkpoint, chosen=chosen, parts_dir=folder.parts,
                                     cache_dir=cache_dir, trainer=cfg.trainer, progress=progress)
        elif ranks.world > 1:
            result = evaluate_on_ranks(cfg, model, data, cache_dir=cache_dir, parts_dir=folder.parts, chosen=chosen,
                                       progress=progress, record=lambda ran: write_json(folder.part_ranks, ran))
            if not ranks.lead:  # rank 0 writes and records the evaluation
                return None, folder.path
        else:
            result = evaluate_here(cfg, model, data, cache_dir=cache_dir, parts_dir=folder.parts,
                                   chosen=chosen, progress=progress)
        result["eval/checkpoint_step"] = float(target.step)
        _plots(cfg, model, data, target, folder.plots)
        folder.settings.write_text(json.dumps(
            {**eval_settings(cfg, chosen), "checkpoint": str(target.checkpoint), "checkpoint_sha256": sha},
            indent=2, default=str) + "\n")
        folder.write_metrics(result)
        folder.complete.write_text(key + "\n")  # the evaluation is whole; recording follows
    if not ranks.lead:
        return None, folder.path
    result = folder.read_metrics()
    _record(cfg, target, folder, result, chosen, sha)
    return result, folder.path


def _record(cfg, target: Target, folder: EvalFolder, result: dict, chosen: list[str], sha: str) -> None:
    """Into the run folder's metrics.json (when the checkpoint is the run's latest) and MLflow
    (once: `.logged` remembers it; an unreachable server is tried again on the next call)."""
    from orchestration.ray.evaluate import eval_settings, log_evaluation

    run_folder = RunFolder(target.run_dir.resolve()) if target.run_dir is not None else None
    if run_folder is not None and run_folder.latest_checkpoint() == target.checkpoint.resolve():
        merged = run_folder.read_metrics() or {}
        merged = {k: v for k, v in merged.items() if not k.startswith("eval/")}
        run_folder.write_metrics({**merged, **result})
    if not cfg.tracking.enabled or folder.logged.is_file():
        return
    from orchestration.mlflow.tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking, cfg.output_dir)
    logged = log_evaluation(
        uri, experiment=cfg.tracking.experiment or cfg.name, run_id=target.run_id, step=target.step,
        name=folder.path.name, metrics=result, settings=eval_settings(cfg, chosen),
        artifacts=[*sorted(folder.plots.glob("*.png")), folder.metrics],
        tags={"lzn.task": cfg.name, "lzn.checkpoint": str(target.checkpoint), "lzn.checkpoint_sha256": sha})
    if logged:
        folder.logged.write_text(json.dumps({"run_id": logged, "uri": uri}) + "\n")
        if target.run_id is None:
            print(f"logged to the new MLflow run {logged} (the checkpoint has no training run)", file=sys.stderr)
