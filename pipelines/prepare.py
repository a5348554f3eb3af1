"""`python -m pipelines.prepare data=<source> [data.root=DIR] [data.name=NAME] [key=value ...]`:
turn a raw dataset into Parquet shards (the pipeline's first stage).

Sources (pipelines/conf/data/): digits, cifar10, imagenet, imagefolder. Shards go to
<data.shards_dir>/<data.name>/<split>/part-NNNNN.parquet with a manifest.json beside the
splits; data.shards_dir defaults to $LZN_DATA_DIR or ./data. Options under
data.prepare (lzn.data.prepare.PrepareConfig): executor=auto|ray|process|serial,
workers, shard_mb, shard_rows, raw_max_side, download, verify. Re-running the same
command rewrites nothing; an interrupted run resumes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lzn.data.prepare import PrepareReport, prepare_dataset
from lzn.data.shards import MANIFEST
from lzn.task import DataConfig
from pipelines.config import to_run_config


@dataclass
class PrepareRun:
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="prepare_schema", node=PrepareRun)


def _map_fn(data: DataConfig):
    """executor=auto|ray encode with Ray tasks (auto: not for tiny inputs); process and serial
    stay in lzn (no Ray)."""
    executor = data.prepare.executor
    if executor in ("auto", "ray"):
        from orchestration.ray.data import auto_map, ray_map

        return (auto_map if executor == "auto" else ray_map)(data.prepare.workers)
    return None


def prepare(data: DataConfig, progress: bool = True) -> PrepareReport:
    """Prepare `data` (a task's or the prepare command's data config)."""
    return prepare_dataset(data.source_name, data.root, data.dataset_dir, data.prepare, splits=data.splits,
                           map_fn=_map_fn(data), progress=progress)


def ensure_prepared(data: DataConfig) -> None:
    """Run the prepare stage when the task's dataset has no manifest yet."""
    if not (data.dataset_dir / MANIFEST).is_file():
        print(f"{data.dataset_dir} is not prepared yet: preparing it from source {data.source_name!r}", flush=True)
        print(prepare(data).describe(), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(dcfg: DictConfig) -> None:
    from lzn.data.sources import SourceError

    cfg = to_run_config(dcfg)
    try:
        report = prepare(cfg.data)
    except SourceError as e:
        raise SystemExit(f"error: {e}") from None
    print(report.describe(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
