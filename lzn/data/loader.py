"""Feeding the trainer without making it wait: the host work of the next steps runs while
this step trains.

A training step gets its batch from `step -> batch`. Here the host part of a batch (which
rows, gathering their uint8 pixels, pinning them for an asynchronous copy when the device
is CUDA) is done ahead, off the training thread; the training thread only hands the rows to
`StepBatcher` (device copy non_blocking, conversion to float and augmentation on the device).

- `prefetch_in_memory`: a split held in memory (uint8). Rows come from `BatchStream`, a
  pure function of (seed, step), so W workers still see the batches of 1 and a resumed run
  continues the same stream; a background thread gathers them (torch's indexing releases
  the GIL).
- `ShardBatches`: the shards streamed (data.loader=stream on the local/torchrun backend),
  decoded by DataLoader worker processes, each rank reading its part of every epoch
  (`RowGroupSampler`: each row group about once an epoch).
Both are closed by whoever made them (`close()` or `with`): no thread or process outlives it.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lzn.data.reader import RowGroupSampler, ShardDataset
from lzn.data.stream import BatchStream
from lzn.errors import UserError

PREFETCH_AHEAD = 2  # batches ready beyond the one training: enough to hide one slow gather


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """`step -> batch` whose host part is produced ahead on a background thread.

    produce(step) -> rows runs on the producer thread for step, step + 1, ... keeping up to
    `ahead` results ready; consume(rows, step) -> batch runs on the caller's (training)
    thread. A request for another step than the next one (a resume, a jump) restarts the
    producer there; an error in produce is raised by the call that asks for its step.
    """

    def __init__(self, produce: Callable[[int], object], consume: Callable[[object, int], dict], *,
                 ahead: int = PREFETCH_AHEAD, name: str = "lzn-prefetch"):
        if ahead < 1:
            raise UserError(f"a prefetcher keeps >= 1 batch ahead, got ahead={ahead}")
        self.produce, self.consume, self.ahead, self.name = produce, consume, ahead, name
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._next = None  # the step the producer's next result is for

    def __call__(self, step: int) -> dict:
        if self._thread is None or step != self._next:
            self._start(step)
        item = self._take()
        if isinstance(item, _Failure):
            self._join()  # the producer has ended; the next call starts afresh
            raise item.error
        self._next = step + 1
        return self.consume(item, step)

    def _take(self):
        while True:  # bounded waits: a producer that died without a word is noticed, not waited on
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the {self.name} thread ended without producing step {self._next}") from None

    def _start(self, step: int) -> None:
        self._join()
        self._stop, self._queue, self._next = threading.Event(), queue.Queue(maxsize=self.ahead), step
        self._thread = threading.Thread(target=self._run, args=(step, self._stop, self._queue),
                                        name=self.name, daemon=True)
        self._thread.start()

    def _run(self, step: int, stop: threading.Event, out: queue.Queue) -> None:
        try:
            while not stop.is_set():
                out.put(self.produce(step))  # blocks while `ahead` results wait
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            out.put(_Failure(e))

    def _join(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        # The producer checks `stop` after each put, so emptying the queue once frees a blocked
        # put and leaves room for the one more it may make before it sees `stop`.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop the producer and wait for it; a later call starts it again."""
        self._join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _on_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def prefetch_in_memory(pixels: Tensor, labels: Tensor, batcher, *, ahead: int = PREFETCH_AHEAD) -> Prefetcher:
    """`step -> batch` over a split in memory, the rows of each step gathered ahead.

    pixels: (N, C, H, W) uint8 (or any dtype `batcher` takes); labels: (N,). batcher: this
    rank's `lzn.data.batches.StepBatcher` (its global batch, seed, rank and world pick the
    rows: the batches are those of `make_batches` over the same split)."""
    if pixels.dim() != 4 or len(pixels) != len(labels):
        raise ValueError(f"pixels must be (N, C, H, W) with one label each; got {tuple(pixels.shape)} "
                         f"and {tuple(labels.shape)}")
    stream = BatchStream(len(pixels), batcher.global_batch, seed=batcher.seed, rank=batcher.rank,
                         world=batcher.world)
    pin = _on_cuda(batcher.device)

    def gather(step: int) -> tuple[Tensor, Tensor]:
        idx = stream.local_indices(step)
        # Gathered straight into page-locked memory: the device copy can then run asynchronously.
        x = torch.empty((len(idx), *pixels.shape[1:]), dtype=pixels.dtype, pin_memory=pin)
        y = torch.empty((len(idx),), dtype=labels.dtype, pin_memory=pin)
        torch.index_select(pixels, 0, idx, out=x)
        torch.index_select(labels, 0, idx, out=y)
        return x, y

    return Prefetcher(gather, lambda rows, step: batcher(*rows, step), ahead=ahead, name="lzn-prefetch-memory")


class ShardRows(Dataset):
    """A DataLoader's view of a split's shards: a batch of row indices -> (pixels, labels,
    indices) as `ShardDataset.pixel_batch` reads them (uint8, squared to image_size, or at
    full resolution for an augmentation that crops any size)."""

    def __init__(self, dataset: ShardDataset, *, image_size: int, channels: int, full_resolution: bool):
        self.dataset, self.image_size, self.channels = dataset, image_size, channels
        self.full_resolution = full_resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]):
        pixels, labels = self.dataset.pixel_batch(indices, image_size=self.image_size, channels=self.channels,
                                                  full_resolution=self.full_resolution)
        return pixels, labels, torch.as_tensor(indices, dtype=torch.int64)

    def __getitem__(self, index: int):
        return self.__getitems__([index])


def _as_read(batch):
    """The DataLoader's collate: `ShardRows.__getitems__` already returns the batch."""
    return batch


class _EpochFrom(Sampler[int]):
    """`sampler`'s order for one epoch from item `start` on (a run resumed within an epoch
    reads no row it already trained on)."""

    def __init__(self, sampler: RowGroupSampler):
        self.sampler, self.start = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.start:])

    def __len__(self) -> int:
        return len(self.sampler) - self.start


class ShardBatches:
    """`step -> batch` streamed from the shards of a split (data.loader=stream on torchrun).

    This rank reads its part of each epoch (`RowGroupSampler(num_replicas=world, rank=rank)`,
    an order a function of (seed, epoch)) in batches of global_batch / world rows, decoded
    by `workers` DataLoader processes (kept across epochs) `prefetch` batches ahead each, and
    pinned when the device is CUDA; the tail of each rank's part is dropped. Step k is
    batch k % steps_per_epoch of epoch k // steps_per_epoch, so a resumed run continues
    where it stopped. Unlike the in-memory stream, W ranks do not see the batches of 1 (each
    rank reads contiguous row groups, to decode each about once).
    """

    def __init__(self, dataset_dir: str | Path, batcher, *, image_size: int, channels: int,
                 full_resolution: bool = False, workers: int = 2, prefetch: int = PREFETCH_AHEAD,
                 split: str = "train"):
        if workers < 0:
            raise UserError(f"the stream's DataLoader workers must be >= 0, got {workers}")
        if prefetch < 2:
            raise UserError(f"the stream prefetches >= 2 batches per worker, got {prefetch}")
        self.batcher, self.local_batch = batcher, batcher.local_batch
        self.dataset = ShardDataset(dataset_dir, split)
        self.sampler = RowGroupSampler(self.dataset, seed=batcher.seed, num_replicas=batcher.world,
                                       rank=batcher.rank)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"each of {batcher.world} ranks reads {len(self.sampler)} rows of {dataset_dir} an "
                            f"epoch, fewer than its batch of {self.local_batch}: lower train.batch_size")
        self._epoch = _EpochFrom(self.sampler)
        rows = ShardRows(self.dataset, image_size=image_size, channels=channels, full_resolution=full_resolution)
        extra = dict(prefetch_factor=prefetch, persistent_workers=True) if workers else {}
        self.loader = DataLoader(rows, batch_size=self.local_batch, sampler=self._epoch, drop_last=True,
                                 num_workers=workers, collate_fn=_as_read, pin_memory=_on_cuda(batcher.device),
                                 **extra)
        self._rows, self._next = None, None
        self.last_indices: Tensor | None = None  # the dataset rows of the last batch (local_batch,)

    def local_indices(self, step: int) -> Tensor:
        """The dataset rows (local_batch,) this rank trains on at `step`, without reading them."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        sampler = RowGroupSampler(self.dataset, seed=self.sampler.seed, num_replicas=self.sampler.num_replicas,
                                  rank=self.sampler.rank)
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), np.int64)
        return torch.from_numpy(order[pos * self.local_batch : (pos + 1) * self.local_batch])

    def _start(self, step: int) -> None:
        epoch, pos = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        self._epoch.start = pos * self.local_batch
        self._rows = iter(self.loader)  # persistent workers: a new epoch reuses them

    def __call__(self, step: int) -> dict:
        if self._rows is None or step != self._next or step % self.steps_per_epoch == 0:
            self._start(step)
        pixels, labels, indices = next(self._rows)
        self._next, self.last_indices = step + 1, indices
        return self.batcher(pixels, labels, step)

    def close(self) -> None:
        """Stop the DataLoader's worker processes (persistent ones outlive an epoch's iterator)."""
        self._rows = None
        it = self.loader._iterator  # the persistent workers' iterator; DataLoader has no public close
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self) -> "ShardBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
