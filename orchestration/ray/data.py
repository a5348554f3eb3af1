"""The data stage on Ray: shard encoding as Ray tasks, and shards read with Ray Data.

`ray_map` is the map function `lzn.data.prepare.prepare_dataset` takes: every shard is a
Ray task (one CPU), at most two per cluster CPU in flight, so the driver's memory stays
bounded on ImageNet-size input. On a multi-node cluster the raw data and the shards
directory must be on storage every node mounts at the same path.

`read_shards` is one pass over a split: the manifest's shards through
`ray.data.read_parquet`, decoded to uint8 pixels in parallel. `stream_passes` is what feeds
Ray Train workers (data.loader=stream): every pass a run needs, one after the other, in one
Ray Data execution, so a pass ending costs nothing (a new execution per pass costs 1-2 s of
start-up, which on a small dataset is many training steps).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lzn import seeds
from lzn.data.reader import decode_table, match_channels, square_pixels, verify_and_list


def ray_map(workers: int = 0) -> Callable[[Callable, Iterable], Iterator]:
    """A map over Ray tasks; connects to $RAY_ADDRESS or the running Ray, or starts a
    local one (stopped when the map ends) with `workers` CPUs (0: all)."""

    def run(fn: Callable, tasks: Iterable) -> Iterator:
        import ray

        started = not ray.is_initialized()
        if started:
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
        try:
            remote = ray.remote(num_cpus=1, max_retries=2)(fn)
            limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
            pending, todo = [], iter(tasks)
            while True:
                while len(pending) < limit and (task := next(todo, None)) is not None:
                    pending.append(remote.remote(task))
                if not pending:
                    return
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            if started:
                ray.shutdown()

    return run


def auto_map(workers: int = 0) -> Callable[[Callable, Iterable], Iterator]:
    """Ray tasks, except for inputs so small that starting Ray would cost more than the work."""
    from lzn.data.prepare import is_small, serial_map

    def run(fn: Callable, tasks: Iterable) -> Iterator:
        tasks = list(tasks)
        yield from (serial_map if is_small(tasks) else ray_map(workers))(fn, tasks)

    return run


def _decode_batch(table, pixel_max: int) -> dict[str, np.ndarray]:
    pixels, labels = decode_table(table)
    if isinstance(pixels, list):  # mixed sizes: a ragged column of (H, W, C) arrays
        ragged = np.empty(len(pixels), dtype=object)
        ragged[:] = pixels
        pixels = ragged
    return {"image": pixels, "label": labels, "source_index": table.column("source_index").to_numpy(),
            "pixel_max": np.full(len(labels), pixel_max, np.int32)}


def _square_batch(batch: dict, size: int, channels: int) -> dict:
    images = batch["image"]
    if (isinstance(images, np.ndarray) and images.dtype != object
            and images.shape[1:] == (size, size, channels)):
        return batch
    return {**batch, "image": np.stack([match_channels(square_pixels(img, size), channels) for img in images])}


def _match_batch(batch: dict, channels: int) -> dict:
    images = batch["image"]
    if isinstance(images, np.ndarray) and images.dtype != object and images.shape[-1] == channels:
        return batch
    matched = [match_channels(img, channels) for img in images]
    if len({img.shape for img in matched}) == 1:
        return {**batch, "image": np.stack(matched)}
    ragged = np.empty(len(matched), dtype=object)
    ragged[:] = matched
    return {**batch, "image": ragged}


COLUMNS = ["image", "encoding", "height", "width", "channels", "label", "source_index"]


def read_shards(dataset_dir: str | Path, split: str, *, verify: bool = False, image_size: int | None = None,
                channels: int = 3, full_resolution: bool = False):
    """A Ray Dataset of one split: rows {"image": (H, W, C) uint8, "label", "source_index",
    "pixel_max"} (images in [-1, 1] are image / pixel_max * 2 - 1). With `image_size`, every
    image is resized (shorter side) and centre-cropped to image_size x image_size with
    `channels` channels, so batches of mixed-size datasets (ImageNet) stack. With
    `full_resolution`, images keep their size and field of view (only `channels` is
    matched), for an augmentation that crops each one (RandomResizedCrop) before stacking."""
    import ray

    manifest, files = verify_and_list(dataset_dir, split, verify=verify)
    ds = ray.data.read_parquet([str(f) for f in files]).select_columns(COLUMNS)  # pushed down into the read
    ds = ds.map_batches(_decode_batch, batch_format="pyarrow", fn_kwargs={"pixel_max": manifest["pixel_max"]})
    return _shaped(ds, image_size=image_size, channels=channels, full_resolution=full_resolution)


def _shaped(ds, *, image_size: int | None, channels: int, full_resolution: bool):
    if full_resolution:
        ds = ds.map_batches(_match_batch, batch_format="numpy", fn_kwargs={"channels": channels})
    elif image_size is not None:
        ds = ds.map_batches(_square_batch, batch_format="numpy", fn_kwargs={"size": image_size, "channels": channels})
    return ds


def pass_plan(files: list, passes: int, seed: int) -> list[dict]:
    """The files of `passes` passes in the order the stream reads them: pass by pass, each
    pass's file order a permutation seeded by (seed, pass) (seeds.row_group_order, the
    stream RowGroupSampler draws for an epoch)."""
    plan = []
    for p in range(passes):
        order = np.random.default_rng(seeds.row_group_order(seed, p)).permutation(len(files))
        plan += [{"pass": p, "file": str(files[i]), "file_index": int(i), "seed": seed} for i in order]
    return plan


def _read_planned(batch: dict, *, pixel_max: int) -> Iterator[dict]:
    """Rows of the planned files, one row group at a time (a task streams its output, so a
    256 MB shard is never one block), the row groups of each file in an order seeded by
    (seed, pass, file)."""
    import pyarrow.parquet as pq

    for p, path, index, seed in zip(batch["pass"], batch["file"], batch["file_index"], batch["seed"]):
        shard = pq.ParquetFile(str(path))
        rng = np.random.default_rng([*seeds.row_group_order(int(seed), int(p)), int(index) + 1])
        for group in rng.permutation(shard.num_row_groups):
            rows = _decode_batch(shard.read_row_group(int(group), columns=COLUMNS), pixel_max)
            yield {**rows, "pass": np.full(len(rows["label"]), p, np.int32)}


MAX_PLAN_BLOCKS = 1000  # the plan's blocks live in the object store: few, however long the run


def passes_needed(rows: int, global_batch: int, steps: int) -> int:
    """Passes over `rows` rows that hold `steps` global batches, with one to spare for the
    rows that uneven blocks leave at the end of each worker's split."""
    if rows < 1 or global_batch < 1 or steps < 0:
        raise ValueError(f"expected rows >= 1, global_batch >= 1, steps >= 0; got {rows}, {global_batch}, {steps}")
    return -(-steps * global_batch // rows) + 1


def stream_passes(dataset_dir: str | Path, split: str, *, seed: int, passes: int | None = None,
                  steps: int | None = None, global_batch: int | None = None, verify: bool = False,
                  image_size: int | None = None, channels: int = 3, full_resolution: bool = False):
    """A Ray Dataset of `passes` passes over one split (or of the passes that hold `steps`
    batches of `global_batch` rows, `passes_needed`), in one execution: the rows of
    `read_shards` plus "pass" (int32), pass 0's rows first, then pass 1's, ... (tasks that
    run at once overlap a little at a boundary). Each pass reads every file once, in an
    order seeded by (seed, pass), and each file's row groups in an order seeded by
    (seed, pass, file); Ray Train splits the stream over the workers (equal=True)."""
    import ray

    manifest, files = verify_and_list(dataset_dir, split, verify=verify)
    if passes is None:
        if steps is None or global_batch is None:
            raise ValueError("stream_passes needs passes, or steps and global_batch")
        passes = passes_needed(manifest["splits"][split]["rows"], global_batch, steps)
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    plan = pass_plan(files, passes, seed)
    ds = ray.data.from_items(plan, override_num_blocks=min(len(plan), MAX_PLAN_BLOCKS))
    ds = ds.map_batches(_read_planned, batch_size=1, batch_format="numpy",
                        fn_kwargs={"pixel_max": manifest["pixel_max"]})
    return _shaped(ds, image_size=image_size, channels=channels, full_resolution=full_resolution)
