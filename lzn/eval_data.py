"""The images an evaluation reads: the task's train split (the FID reference, the probe's
training set, the reconstructed images) and its held-out split, by row range or by index,
from memory (the end of a training run) or from a prepared dataset's shards (any worker)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor


class EvalData(Protocol):
    """The task's images: split "train" (the FID reference, the probe's training set) and
    "test" (the held-out split), read by row range at the task's size (`resize`: the shorter
    side before the centre crop, the probe's Resize(256) + CenterCrop(224); None: the size),
    or by row index (`rows_at`: indices (n,), rows returned in that order)."""

    def size(self, split: str) -> int: ...
    def rows(self, split: str, lo: int, hi: int, resize: int | None = None) -> tuple[Tensor, Tensor]: ...
    def rows_at(self, split: str, indices: Tensor, resize: int | None = None) -> tuple[Tensor, Tensor]: ...
    @property
    def dataset_dir(self) -> Path | None: ...


class InMemoryData:
    """An `lzn.data.reader.ImageSplit` already in memory (the end of a training run)."""

    def __init__(self, split, dataset_dir: Path | None = None):
        self.split, self._dir = split, dataset_dir

    @property
    def dataset_dir(self) -> Path | None:
        return self._dir

    def _pair(self, split: str) -> tuple[Tensor, Tensor]:
        s = self.split
        return (s.train_images, s.train_labels) if split == "train" else (s.test_images, s.test_labels)

    def size(self, split: str) -> int:
        return len(self._pair(split)[1])

    def rows(self, split: str, lo: int, hi: int, resize: int | None = None) -> tuple[Tensor, Tensor]:
        from lzn.data.reader import resize_centre_crop

        images, labels = self._pair(split)
        return resize_centre_crop(images[lo:hi], resize), labels[lo:hi]

    def rows_at(self, split: str, indices: Tensor, resize: int | None = None) -> tuple[Tensor, Tensor]:
        from lzn.data.reader import resize_centre_crop

        images, labels = self._pair(split)
        indices = torch.as_tensor(indices, dtype=torch.long)
        return resize_centre_crop(images[indices], resize), labels[indices]


class ShardData:
    """A prepared dataset's shards, read by row range at the task's size (mixed sizes resized
    and centre-cropped, as the training stream does): a worker holds only the rows of the
    unit it computes."""

    def __init__(self, dataset_dir: str | Path, *, image_size: int, channels: int):
        from lzn.data.reader import _held_out
        from lzn.data.shards import read_manifest

        self._dir, self.image_size, self.channels = Path(dataset_dir), image_size, channels
        self.names = {"train": "train", "test": _held_out(self._dir, read_manifest(self._dir)["splits"])}
        self._readers = {}

    @property
    def dataset_dir(self) -> Path:
        return self._dir

    def _reader(self, split: str):
        from lzn.data.reader import ShardDataset

        if split not in self._readers:
            self._readers[split] = ShardDataset(self._dir, self.names[split])
        return self._readers[split]

    def size(self, split: str) -> int:
        return len(self._reader(split))

    def rows(self, split: str, lo: int, hi: int, resize: int | None = None) -> tuple[Tensor, Tensor]:
        return self._reader(split).squared(lo, hi, image_size=self.image_size, channels=self.channels, resize=resize)

    def rows_at(self, split: str, indices: Tensor, resize: int | None = None) -> tuple[Tensor, Tensor]:
        # Grouped by row group in the reader: each group the indices touch is read once.
        return self._reader(split).squared_at(torch.as_tensor(indices, dtype=torch.long).numpy(),
                                              image_size=self.image_size, channels=self.channels, resize=resize)
