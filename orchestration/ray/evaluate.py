"""The evaluation stage on Ray, and its record in MLflow.

`evaluate_on_ray` starts `trainer.num_workers` Ray actors (a GPU each with
trainer.use_gpu), each loading the checkpoint's EMA model and the data once; an
`ActorPool` hands them the units of `lzn.evaluate.plan` as they finish the previous one,
and each worker writes its parts into the evaluation's parts folder (shared storage on a
cluster). The driver merges the parts once, in unit order (`lzn.evaluate.evaluate`), so the
numbers do not depend on the number of workers; the linear probe trains on one of them.
A worker that dies is restarted (`trainer.max_failures`) and its unit retried; parts
already written are never recomputed, also when the command is run again. parts/workers.json
says where each part was computed: unit -> {hostname, pid, ip, node_id} of its actor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lzn.errors import UserError
from lzn.eval_data import ShardData
from lzn.evaluate import Evaluator, PartStore, Unit, evaluate, fid_extractor, load_model, train_probe
from orchestration.folder import PARTS_WORKERS
from orchestration.network import node_identity
from orchestration.ray.train import RayTrainerConfig, absolute_paths, check_cpus, init_ray
from orchestration.run import RunConfig


@dataclass
class WorkerSpec:
    cfg: Any  # the task config, with absolute paths
    checkpoint: str
    parts_dir: str
    cache_dir: str
    use_gpu: bool
    cpus: float


class EvalWorker:
    """One Ray actor: the model, the data and the extractor, loaded once for all its units."""

    def __init__(self, spec: WorkerSpec):
        import torch

        torch.set_num_threads(max(1, round(spec.cpus)))
        self.spec, self.device = spec, torch.device("cuda" if spec.use_gpu else "cpu")
        model, _ = load_model(spec.cfg, spec.checkpoint, self.device)
        data = ShardData(spec.cfg.data.dataset_dir, image_size=spec.cfg.data.image_size,
                         channels=spec.cfg.data.channels)
        self.evaluator = Evaluator(spec.cfg, model, data, cache_dir=spec.cache_dir)
        self.store = PartStore(spec.parts_dir)

    def run(self, unit: Unit) -> tuple[str, dict]:
        """Compute and save `unit`; returns its name and where it ran (hostname, pid, Ray node IP and id)."""
        self.store.save(unit, self.evaluator.run(unit))
        return unit.name, node_identity()

    def probe(self, train_units: list[Unit], test_units: list[Unit], progress: bool = True) -> dict:
        return train_probe(self.spec.cfg, self.store, train_units, test_units, device=self.device, progress=progress)


def evaluate_on_ray(cfg: RunConfig, checkpoint: str | Path, *, chosen: list[str], parts_dir: str | Path,
                    cache_dir: str | Path, trainer: RayTrainerConfig, progress: bool = True) -> dict:
    """The evaluation of `checkpoint` sharded over Ray actors ($RAY_ADDRESS or a local Ray)."""
    import ray
    from ray.util import ActorPool

    if trainer.num_workers < 1 or not trainer.cpus_per_worker > 0:
        raise UserError(f"trainer.num_workers must be >= 1 and trainer.cpus_per_worker > 0, got "
                        f"{trainer.num_workers} and {trainer.cpus_per_worker}")
    cfg = absolute_paths(cfg)
    parts_dir, cache_dir = Path(parts_dir).resolve(), Path(cache_dir).resolve()
    data = ShardData(cfg.data.dataset_dir, image_size=cfg.data.image_size, channels=cfg.data.channels)
    spec = WorkerSpec(cfg, str(Path(checkpoint).resolve()), str(parts_dir), str(cache_dir), trainer.use_gpu,
                      trainer.cpus_per_worker)
    started = init_ray()
    actors = []
    try:
        autoscaling = bool(os.environ.get("RAY_ADDRESS"))
        check_cpus(trainer, ray.cluster_resources().get("CPU", 0), stream=False, autoscaling=autoscaling)
        gpus = ray.cluster_resources().get("GPU", 0)
        if trainer.use_gpu and gpus < trainer.num_workers and not autoscaling:
            raise UserError(f"trainer.use_gpu=true with trainer.num_workers={trainer.num_workers} needs a GPU per "
                            f"worker; this Ray has {gpus:g}. Lower trainer.num_workers, or trainer.use_gpu=false")
        worker = ray.remote(EvalWorker).options(
            num_cpus=trainer.cpus_per_worker, num_gpus=1 if trainer.use_gpu else 0,
            max_restarts=trainer.max_failures, max_task_retries=trainer.max_failures)

        def start(n: int) -> None:
            while len(actors) < n:
                actors.append(worker.remote(spec))

        def execute(units: list[Unit]) -> None:
            start(min(trainer.num_workers, len(units)))
            pool = ActorPool(actors)
            done = pool.map_unordered(lambda actor, unit: actor.run.remote(unit), units)
            workers = dict(tqdm(done, total=len(units), desc=f"evaluate ({len(actors)} Ray workers)",
                                unit="shard", disable=not progress, file=sys.stderr))
            log = parts_dir / PARTS_WORKERS
            known = json.loads(log.read_text()) if log.is_file() else {}
            log.write_text(json.dumps({**known, **workers}, indent=1, sort_keys=True) + "\n")

        def probe(store, train_units, test_units) -> dict:
            start(1)
            return ray.get(actors[0].probe.remote(train_units, test_units, progress))

        return evaluate(cfg, chosen=chosen, data=data, store=PartStore(parts_dir), execute=execute,
                        extractor=lambda: fid_extractor(cfg.eval.fid_features, cache_dir, cfg.eval.inception_weights),
                        probe=probe)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------- MLflow
def log_evaluation(uri: str, *, experiment: str, run_id: str | None, step: int, name: str, metrics: dict,
                   settings: dict, artifacts: list[Path], tags: dict[str, str]) -> str | None:
    """Log an evaluation to MLflow run `run_id` (the training run), or to a new run in
    `experiment` when the checkpoint has none. Numbers become metrics at `step` (the
    checkpoint's), the rest tags; the settings (tag lzn.eval.<name>) and the artifacts
    (eval/<name>/) are kept apart per evaluation `name` (step-<step>-<key>).
    Returns the run id, or None (with a warning) when the server cannot take it."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from orchestration.mlflow.pending import fail_fast, warn
    from orchestration.mlflow.runs import find_or_create_experiment

    fail_fast()
    client, new = MlflowClient(uri), run_id is None
    try:
        if new:
            run = client.create_run(find_or_create_experiment(client, experiment, uri),
                                    run_name=f"eval-step{step}", tags=tags)
            run_id = run.info.run_id
        now = int(time.time() * 1000)
        numbers = [Metric(k, float(v), now, step) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        texts = [RunTag(k, str(v)) for k, v in metrics.items() if isinstance(v, str)]
        texts.append(RunTag(f"lzn.eval.{name}", json.dumps(settings, sort_keys=True)[:5000]))
        client.log_batch(run_id, metrics=numbers, tags=texts)
        for path in artifacts:
            client.log_artifact(run_id, str(path), f"eval/{name}")
        if new:
            client.set_terminated(run_id)
        return run_id
    except Exception as e:  # noqa: BLE001 - the evaluation is on disk; tracking must not lose it
        warn(f"could not log the evaluation to {uri} ({type(e).__name__}: {str(e)[:300]}); "
             "it is in the evaluation folder's metrics.json")
        return None


def eval_settings(cfg: RunConfig, chosen: list[str]) -> dict:
    return {"metrics": chosen, **{f"eval.{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}}
