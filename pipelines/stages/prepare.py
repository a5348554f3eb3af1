"""The prepare stage: a raw dataset as Parquet shards (`lzn.data.prepare`), encoded by Ray
tasks or a local pool."""
from __future__ import annotations

from pathlib import Path

from lzn.data.prepare import PrepareReport, prepare_dataset
from lzn.data.resize import Target
from lzn.data.shards import MANIFEST, ShardError, read_manifest
from lzn.data.sources import SourceError
from lzn.errors import UserError
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
                           map_fn=_map_fn(data), progress=progress, target=target(data), holdout=data.holdout,
                           holdout_seed=data.holdout_seed)


def target(data: DataConfig) -> Target | None:
    """The images the task's model sees, when the prepare stage makes them (data.prepare.resize)."""
    return Target(data.image_size, data.channels) if data.prepare.resize else None


def stale(data: DataConfig) -> str | None:
    """Why the prepared dataset is not the one `data` asks for (another root, size or held-out
    split), or None when it is or cannot be told (no root given: the shards are the data)."""
    try:
        manifest = read_manifest(data.dataset_dir)
    except ShardError as e:
        return f"its manifest does not read ({e})"
    if data.root is not None:
        root = str(Path(data.root).expanduser().resolve())
        if (manifest.get("source") or {}).get("root") != root:
            return f"it was prepared from {(manifest.get('source') or {}).get('root')}, not {root}"
    want, have = target(data), manifest.get("resize")
    if want is not None and (have is None or (have["size"], have["channels"]) != (want.size, want.channels)):
        return f"it holds {'images as stored' if have is None else have['size']} px, not {want.shape}"
    held = manifest.get("holdout")
    if held is not None and (held["fraction"], held["seed"]) != (data.holdout, data.holdout_seed):
        return f"its held-out split is {held['fraction']} at seed {held['seed']}"
    return None


def ensure_prepared(data: DataConfig) -> None:
    """Run the prepare stage when the task's dataset has no manifest yet, or one made from
    other data or settings (`stale`): the same dataset name on another folder is prepared anew."""
    if not (data.dataset_dir / MANIFEST).is_file():
        print(f"{data.dataset_dir} is not prepared yet: preparing it from source {data.source_name!r}", flush=True)
    elif reason := stale(data):
        print(f"{data.dataset_dir} is prepared, but {reason}: preparing it again", flush=True)
    else:
        return
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


def check_trainable(cfg) -> None:
    """The prepared dataset can make this run (a TaskConfig's `cfg`), said before any server or
    worker starts: a train and a held-out split, as many classes as data.num_classes where the
    objective reads labels, and in memory (data.loader=memory) only what fits."""
    from lzn.data.reader import in_memory_problem

    d = cfg.data
    problem = in_memory_problem(d.dataset_dir, image_size=d.image_size, channels=d.channels)  # raises without splits
    if d.loader == "memory" and problem:
        raise UserError(f"data.loader=memory but {problem}: use data.loader=auto or stream, or "
                        "data.prepare.resize=true to store the images at data.image_size")
    if d.loader == "auto" and problem and not d.prepare.resize:
        print(f"note: {problem}, so the train split streams from the shards; data.prepare.resize=true (as the "
              "*_images tasks set) stores the images at data.image_size and trains them in memory", flush=True)
    classes = read_manifest(d.dataset_dir)["classes"]
    labelled = cfg.objective in ("joint", "representation", "simclr")  # the classifier, the probe
    if labelled and not classes:
        raise UserError(f"objective {cfg.objective!r} reads class labels, and {d.dataset_dir} has none (a flat "
                        "folder of images): put them in <class>/ folders, or train task=gen_images")
    if labelled and len(classes) != d.num_classes:
        raise UserError(f"data.num_classes={d.num_classes} but {d.dataset_dir} holds {len(classes)} "
                        f"classes {classes[:10]}{' ...' if len(classes) > 10 else ''}: pass "
                        f"data.num_classes={len(classes)}")
