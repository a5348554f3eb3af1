"""The prepare stage: a raw dataset (lzn.data.sources) -> Parquet shards + manifest.

`prepare_dataset` lists the source, packs its items into shards of bounded size, and
encodes the shards in parallel through an injected `map_fn` (a process pool here; Ray
tasks from orchestration.ray.data). It is
- idempotent: when the manifest's input fingerprint matches and every shard checks out,
  nothing is rewritten;
- crash-safe: each shard is renamed into place when complete and records the
  fingerprint of its inputs, so a re-run after a crash keeps the finished shards and
  writes only the rest; the manifest, written last, is removed before any rewrite;
- tolerant: an item that does not decode is skipped and listed in the manifest;
- what a task sees, when asked (`target`): every image converted to the task's channels and,
  when its size differs, resized (shorter side) and centre-cropped (lzn.data.resize); the
  manifest's "resize" records how and from which sizes;
- held out: a dataset without a test or val split gets a stratified, seeded one (`holdout`,
  lzn.data.holdout), recorded in the manifest's "holdout"; a split the data has is kept.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from lzn.atomic import remove_stale_temporaries
from lzn.data.shards import (
    MANIFEST, SCHEMA_VERSION, ShardSummary, encode_image, read_manifest, shard_fingerprint, shard_name,
    split_entry, summarize_shard, verify_shards, write_manifest, write_shard,
)
from lzn.data.holdout import HELD_OUT, HELD_OUT_SPLITS, check_fraction, counts, hold_out
from lzn.data.resize import METHOD, Target, prepared_pixels, source_shape
from lzn.data.sources import SOURCES, Item, Listing, SourceError
from lzn.errors import UserError

EXECUTORS = ("auto", "ray", "process", "serial")


@dataclass
class PrepareConfig:
    executor: str = "auto"  # auto, ray (Ray tasks; auto: serial for tiny inputs), process (a local pool), serial
    workers: int = 0  # parallel encoders; 0: one per CPU
    shard_mb: float = 256.0  # a shard closes at this many MB of image bytes...
    shard_rows: int = 100_000  # ...or this many rows
    raw_max_side: int = 64  # images up to this side are stored as raw pixels, larger ones as stored
    download: bool = False  # fetch the source when it can be downloaded (cifar10)
    verify: bool = True  # a re-run checks every shard's SHA-256 (else sizes only)
    # Store every image as the task sees it: data.channels, data.image_size square (shorter side
    # resized, centre crop). False: as the source stores them (a cropping augmentation needs those).
    resize: bool = False


@dataclass(frozen=True)
class ShardTask:
    path: str  # the final shard path
    fingerprint: str  # of everything the shard's content depends on
    items: tuple[Item, ...]
    first_index: int  # source_index of items[0]
    raw_max_side: int
    target: Optional[Target] = None  # convert and resize every image to this (None: as stored)


@dataclass
class PrepareReport:
    dataset_dir: Path
    rows: dict[str, int]
    written: int  # shards encoded by this run
    reused: int  # shards kept from an interrupted or earlier run
    repaired: list[str] = field(default_factory=list)  # shards that failed verification and were rewritten
    rejected: int = 0
    up_to_date: bool = False  # nothing to do: the manifest and every shard matched

    def describe(self) -> str:
        if self.up_to_date:
            return f"{self.dataset_dir}: up to date ({self._rows()}); nothing rewritten"
        text = (f"{self.dataset_dir}: {self._rows()}; {self.written} shard(s) written, {self.reused} kept, "
                f"{self.rejected} file(s) rejected")
        if self.rejected:
            text += f" (listed in {self.dataset_dir / MANIFEST})"
        return text

    def _rows(self) -> str:
        return ", ".join(f"{split} {n} images" for split, n in self.rows.items())


MapFn = Callable[[Callable, Iterable], Iterator]


def run_shard_task(task: ShardTask) -> tuple[str, ShardSummary]:
    """Decode and check every item of a shard, write it, and summarise it (runs on a worker)."""
    rows, rejected = [], []
    for k, item in enumerate(task.items):
        try:
            cols = encode_image(_target_image(item.read(), task.target, task.raw_max_side)
                                if task.target else item.read(), task.raw_max_side)
        except Exception as e:  # noqa: BLE001 - PIL raises many types; any of them rejects the file
            # Without object addresses (PIL names its BytesIO): the same input gives the same shard.
            rejected.append({"path": item.path, "reason": re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")})
            continue
        rows.append({**cols, "label": item.label, "class_name": item.class_name,
                     "source_index": task.first_index + k, "source_path": item.path})
    return task.path, write_shard(Path(task.path), rows, fingerprint=task.fingerprint, rejected=rejected)


def _target_image(data, target: Target, raw_max_side: int):
    """The task's pixels: raw up to raw_max_side, else PNG (lossless) bytes."""
    pixels = prepared_pixels(data, target)
    if target.size <= raw_max_side:
        return pixels
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if target.channels == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def serial_map(fn: Callable, tasks: Iterable) -> Iterator:
    for task in tasks:
        yield fn(task)


def process_map(workers: int) -> MapFn:
    """A map over a pool of `workers` processes, at most 2 tasks per worker in flight
    (memory stays bounded however many shards there are); results in completion order."""

    def run(fn: Callable, tasks: Iterable) -> Iterator:
        pending, todo = set(), iter(tasks)
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                while True:
                    while len(pending) < 2 * workers and (task := next(todo, None)) is not None:
                        pending.add(pool.submit(fn, task))
                    if not pending:
                        return
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()

    return run


def plan_shards(items: list[Item], split_dir: Path, *, shard_bytes: int, shard_rows: int, raw_max_side: int,
                salt: str, target: Optional[Target] = None) -> list[ShardTask]:
    """Pack `items` (in order) into shards of at most `shard_bytes` / `shard_rows`."""
    groups, current, size = [], [], 0
    for item in items:
        if current and (size + item.size > shard_bytes or len(current) >= shard_rows):
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        groups.append(current)
    tasks, first = [], 0
    for index, group in enumerate(groups):
        h = hashlib.sha256(f"{salt}|{first}".encode())
        for item in group:
            h.update(f"{item.path}|{item.stamp}|{item.label}|{item.class_name}\n".encode())
        tasks.append(ShardTask(str(split_dir / shard_name(index)), h.hexdigest(), tuple(group), first, raw_max_side,
                               target))
        first += len(group)
    return tasks


def split_off_holdout(listing: Listing, fraction: float, seed: int) -> Optional[dict]:
    """Without a held-out split (HELD_OUT_SPLITS), move a stratified, seeded `fraction` of
    train to a new HELD_OUT split, in listing order; the manifest's record of it, or None when
    the data has its own (kept as it is) or fraction is 0."""
    check_fraction(fraction)
    if fraction == 0 or "train" not in listing.splits or any(listing.splits.get(s) for s in HELD_OUT_SPLITS):
        return None
    items = listing.splits["train"]
    held = hold_out([i.label for i in items], fraction, seed)
    if not held.any():
        raise SourceError(f"data.holdout={fraction} holds out no image of the {len(items)} in train (every class "
                          "needs 2 or more): add images, or make a test/ split yourself")
    listing.splits = {**listing.splits, "train": [i for i, h in zip(items, held) if not h],
                      HELD_OUT: [i for i, h in zip(items, held) if h]}
    return {"from": "train", "to": HELD_OUT, "fraction": fraction, "seed": seed, "stratified_by": "class",
            "counts": counts([i.class_name for i in items], held)}


def resize_record(listing: Listing, target: Target) -> dict:
    """The manifest's record of what the prepare stage did to the images' sizes and modes."""
    shapes = {split: collections.Counter(filter(None, (source_shape(i.ref) for i in items)))
              for split, items in listing.splits.items()}
    changed = lambda shape: shape.split("x")[:2] != [str(target.size)] * 2
    return {"size": target.size, "channels": target.channels, "method": METHOD,
            "source_sizes": {s: dict(sorted(c.items())) for s, c in shapes.items()},
            "resized": {s: sum(n for shape, n in c.items() if changed(shape)) for s, c in shapes.items()}}


def prepare_dataset(source: str, root: Optional[str], dataset_dir: Path, cfg: PrepareConfig, *,
                    splits: Optional[list[str]] = None, map_fn: Optional[MapFn] = None,
                    progress: bool = True, target: Optional[Target] = None, holdout: float = 0.0,
                    holdout_seed: int = 0) -> PrepareReport:
    """Prepare `source` (read from `root`) as shards in `dataset_dir` (see the module doc):
    images as `target` (None: as stored); `holdout` of each class held out when there is no
    held-out split."""
    if source not in SOURCES:
        raise SourceError(f"unknown data source {source!r}; expected one of {sorted(SOURCES)}")
    if cfg.shard_mb <= 0 or cfg.shard_rows < 1 or cfg.raw_max_side < 0:
        raise UserError(f"data.prepare needs shard_mb > 0, shard_rows >= 1 and raw_max_side >= 0; got "
                        f"{cfg.shard_mb}, {cfg.shard_rows}, {cfg.raw_max_side}")
    dataset_dir = Path(dataset_dir)
    listing = SOURCES[source](root, download=cfg.download, splits=splits)
    if not any(listing.splits.values()):
        raise SourceError(f"source {source!r} at {root} lists no images in any split")
    held_out = split_off_holdout(listing, holdout, holdout_seed)
    resized = resize_record(listing, target) if target else None
    salt = f"v{SCHEMA_VERSION}|{cfg.raw_max_side}|{listing.pixel_max}|{target.shape if target else 'as stored'}"
    plan = {split: plan_shards(items, dataset_dir / split, shard_bytes=int(cfg.shard_mb * 2**20),
                               shard_rows=cfg.shard_rows, raw_max_side=cfg.raw_max_side, salt=salt, target=target)
            for split, items in listing.splits.items()}
    fingerprint = hashlib.sha256(json.dumps(
        {"classes": listing.classes, "rejected": listing.rejected, "holdout": held_out, "resize": resized,
         "shards": {s: [t.fingerprint for t in ts] for s, ts in plan.items()}}, sort_keys=True).encode()).hexdigest()

    bad: set[str] = set()
    if (dataset_dir / MANIFEST).is_file():
        try:
            manifest = read_manifest(dataset_dir)
        except Exception:  # noqa: BLE001 - an unreadable manifest is rebuilt, not trusted
            manifest = {}
        if manifest.get("fingerprint") == fingerprint:
            problems = verify_shards(dataset_dir, checksums=cfg.verify, manifest=manifest)
            if not problems:
                return PrepareReport(dataset_dir, {s: e["rows"] for s, e in manifest["splits"].items()}, 0,
                                     sum(len(e["shards"]) for e in manifest["splits"].values()),
                                     rejected=sum(len(e["rejected"]) for e in manifest["splits"].values()),
                                     up_to_date=True)
            bad = {str(path) for path, _ in problems}
        # From here on the old manifest would describe shards that are being replaced.
        (dataset_dir / MANIFEST).unlink()

    todo, kept = [], []
    for split, tasks in plan.items():
        remove_stale_temporaries(dataset_dir / split)
        for task in tasks:
            if task.path not in bad and Path(task.path).is_file() and shard_fingerprint(task.path) == task.fingerprint:
                kept.append(task)
            else:
                todo.append(task)

    summaries: dict[str, ShardSummary] = {t.path: summarize_shard(Path(t.path)) for t in kept}
    summaries.update(_run(todo, map_fn or _default_map(cfg, todo), dataset_dir.name, progress))
    for split, tasks in plan.items():
        names = {Path(t.path).name for t in tasks}
        for extra in (dataset_dir / split).glob("part-*.parquet"):
            if extra.name not in names:  # left by an earlier run over more input
                extra.unlink()

    entries = {}
    for split, tasks in plan.items():
        entry = split_entry([summaries[t.path] for t in tasks])
        entry["rejected"] = listing.rejected.get(split, []) + entry["rejected"]
        entries[split] = entry
    write_manifest(dataset_dir, {
        "schema_version": SCHEMA_VERSION, "name": dataset_dir.name,
        "source": {"kind": source, "root": None if root is None else str(Path(root).expanduser().resolve())},
        "fingerprint": fingerprint, "pixel_max": listing.pixel_max, "classes": listing.classes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resize": resized, "holdout": held_out, "splits": entries,
    })
    return PrepareReport(dataset_dir, {s: e["rows"] for s, e in entries.items()}, len(todo), len(kept),
                         repaired=sorted(bad), rejected=sum(len(e["rejected"]) for e in entries.values()))


SMALL_INPUT_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


def is_small(tasks: list[ShardTask]) -> bool:
    """Too little input for parallel workers to pay for their start."""
    return len(tasks) < 2 or sum(item.size for t in tasks for item in t.items) < SMALL_INPUT_BYTES


def _default_map(cfg: PrepareConfig, tasks: list[ShardTask]) -> MapFn:
    workers = min(cfg.workers or os.cpu_count() or 1, len(tasks))
    if cfg.executor == "serial" or workers <= 1 or (cfg.executor == "auto" and is_small(tasks)):
        return serial_map
    if cfg.executor in ("process", "auto"):
        return process_map(workers)
    raise UserError(f"executor {cfg.executor!r} needs a map function from orchestration (Ray); "
                    f"lzn alone runs 'process' or 'serial'")


def _run(tasks: list[ShardTask], map_fn: MapFn, name: str, progress: bool) -> dict[str, ShardSummary]:
    from tqdm.auto import tqdm

    out = {}
    if not tasks:
        return out
    bar = tqdm(total=sum(len(t.items) for t in tasks), unit="img", desc=f"prepare {name}", disable=not progress,
               dynamic_ncols=True)
    sizes = {t.path: len(t.items) for t in tasks}
    rejected = 0
    with bar:
        for path, summary in map_fn(run_shard_task, tasks):
            out[path] = summary
            rejected += len(summary.rejected)
            bar.update(sizes[path])
            bar.set_postfix(shards=f"{len(out)}/{len(tasks)}", rejected=rejected)
    return out
