"""The prepare stage: a raw dataset as Parquet shards (`lzn.data.prepare`), encoded by Ray
tasks or a local pool."""
from __future__ import annotations

from pathlib import Path

from lzn.data.prepare import PrepareReport, prepare_dataset
from lzn.data.shards import MANIFEST
from lzn.data.sources import SourceError
from lzn.task import DataConfig


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


def check_data(data: DataConfig) -> None:
    """The dataset is prepared (or can be, here): else say which, where it was looked for and
    how to prepare it, before anything starts on it (a sweep's trials)."""
    try:
        ensure_prepared(data)
    except SourceError as e:
        raise SourceError(f"dataset {data.name!r} is not prepared: no {data.dataset_dir.resolve() / MANIFEST}. "
                          f"Prepare it with `python -m pipelines.prepare data={data.source_name} data.root=<folder>` "
                          f"(or pass data.root= to this command; LZN_DATA_DIR moves "
                          f"{Path(data.shards_dir).resolve()}). {e}") from None
