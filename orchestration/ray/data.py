"""The data stage on Ray: shard encoding as Ray tasks, and shards read with Ray Data.

`ray_map` is the map function `lzn.data.prepare.prepare_dataset` takes: every shard is a
Ray task (one CPU), at most two per cluster CPU in flight, so the driver's memory stays
bounded on ImageNet-size input. On a multi-node cluster the raw data and the shards
directory must be on storage every node mounts at the same path.

`read_shards` is the Ray Data pipeline that feeds Ray Train workers: the manifest's
shards through `ray.data.read_parquet`, decoded to uint8 pixels in parallel.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

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
    ds = ray.data.read_parquet([str(f) for f in files]).select_columns(  # pushed down into the read
        ["image", "encoding", "height", "width", "channels", "label", "source_index"])
    ds = ds.map_batches(_decode_batch, batch_format="pyarrow", fn_kwargs={"pixel_max": manifest["pixel_max"]})
    if full_resolution:
        ds = ds.map_batches(_match_batch, batch_format="numpy", fn_kwargs={"channels": channels})
    elif image_size is not None:
        ds = ds.map_batches(_square_batch, batch_format="numpy", fn_kwargs={"size": image_size, "channels": channels})
    return ds
