"""Reading prepared shards: a torch Dataset with random access, a row-group-aware
sampler, and whole splits in memory for the small datasets the digits tasks train on.

Pixels come back as the library's images: (C, H, W) float32 in [-1, 1], scaled by the
dataset's white value (`pixel_max` in the manifest: 255, or 16 for digits); or, for
training, as stored: uint8 (C, H, W) in [0, pixel_max], a quarter of the bytes, converted
on the device (`ShardDataset.pixel_batch`, `load_pixel_split`).
"""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lzn import seeds
from lzn.data.shards import ShardError, decode_image, read_manifest, split_files, verify_shards
from lzn.errors import UserError

_COLUMNS = ["image", "encoding", "height", "width", "channels", "label"]


@dataclass(frozen=True)
class ImageSplit:
    """A train/test split held in memory."""
    train_images: Tensor  # (n_train, C, H, W) float32 in [-1, 1]
    train_labels: Tensor  # (n_train,) int64
    test_images: Tensor  # (n_test, C, H, W)
    test_labels: Tensor  # (n_test,)


class FloatRows:
    """uint8 images (n, C, H, W) in [0, pixel_max] read as float32 in [-1, 1]: indexing (an
    int, a slice, an index tensor) converts only the rows it selects, so the split stays uint8
    in memory while an evaluation reads it unit by unit."""

    def __init__(self, pixels: Tensor, pixel_max: int):
        self.pixels, self.pixel_max = pixels, pixel_max

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    dtype = torch.float32

    def __getitem__(self, index) -> Tensor:
        return pixels_as_float(self.pixels[index], self.pixel_max)


@dataclass(frozen=True)
class PixelSplit:
    """A train/test split held in memory as stored, uint8: what in-memory training holds.
    `train_images` and `test_images` read it as an `ImageSplit` does (float32 in [-1, 1],
    converted per read), so an evaluation takes it in place of one."""
    train_pixels: Tensor  # (n_train, C, H, W) uint8 in [0, pixel_max]
    train_labels: Tensor  # (n_train,) int64
    test_pixels: Tensor  # (n_test, C, H, W) uint8
    test_labels: Tensor  # (n_test,)
    pixel_max: int  # the dataset's white value (the manifest's)

    @property
    def train_images(self) -> FloatRows:
        return FloatRows(self.train_pixels, self.pixel_max)

    @property
    def test_images(self) -> FloatRows:
        return FloatRows(self.test_pixels, self.pixel_max)


def pixels_as_float(pixels: Tensor, pixel_max: int) -> Tensor:
    """(..., C, H, W) uint8 in [0, pixel_max] -> float32 in [-1, 1], on the pixels' device."""
    return pixels.float().mul_(2.0 / pixel_max).sub_(1.0)


def _raw_array(table: pa.Table) -> np.ndarray | None:
    """(n, H, W, C) uint8 of a table whose rows are all raw and of one size: a single reshape
    of the column's buffer, no per-row work. None for any other table."""
    n = table.num_rows
    enc, h, w, c = (table.column(k).to_pylist() for k in ("encoding", "height", "width", "channels"))
    if n == 0 or set(enc) != {"raw"} or len(set(zip(h, w, c))) != 1:
        return None
    images = table.column("image").combine_chunks()
    offsets = np.frombuffer(images.buffers()[1], np.int32)[images.offset : images.offset + n + 1]
    data = np.frombuffer(images.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(n, h[0], w[0], c[0]).copy()  # a writable copy, once per table


def _decode_row(table: pa.Table, row: int) -> np.ndarray:
    return decode_image(*(table.column(k)[row].as_py() for k in ("image", "encoding", "height", "width", "channels")))


def decode_table(table: pa.Table) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Pixels and labels of the rows of a shard table: (n, H, W, C) uint8 when every row has
    the same size, else a list of (H, W, C)."""
    labels = table.column("label").to_numpy().astype(np.int64)
    array = _raw_array(table)
    if array is not None:
        return array, labels
    pixels = [_decode_row(table, i) for i in range(table.num_rows)]
    uniform = len({p.shape for p in pixels}) == 1
    return (np.stack(pixels) if uniform else pixels), labels


def to_float(pixels: np.ndarray, pixel_max: int) -> Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float()
    return x.mul_(2.0 / pixel_max).sub_(1.0)  # in place: one pass over a large image, not three


def verify_and_list(dataset_dir: str | Path, split: str, *, verify: bool = False) -> tuple[dict, list[Path]]:
    """The manifest and the shard paths of `split`, after checking every shard's size (and
    with `verify`, its SHA-256) against the manifest."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    files = split_files(dataset_dir, split, manifest)
    problems = verify_shards(dataset_dir, checksums=verify, manifest=manifest, splits=[split])
    if problems:
        lines = "\n".join(f"  {p}: {why}" for p, why in problems[:10])
        raise ShardError(f"the shards of {dataset_dir} do not match its manifest:\n{lines}\n"
                         "re-run the prepare stage to repair them")
    return manifest, files


class ShardDataset(Dataset):
    """Random access over one split: item i -> (image (C, H, W) float32 in [-1, 1], label).

    A read loads the row group that holds the item and keeps the most recent row groups
    (up to `cache_mb`) per process: raw rows as pixels, encoded rows as their bytes, decoded
    when read. Sequential and row-group-local orders (RowGroupSampler) load each group once. Works with DistributedSampler and DataLoader
    workers (each worker opens its own files). `verify` checks every shard's SHA-256 first;
    sizes are always checked.
    """

    def __init__(self, dataset_dir: str | Path, split: str, *, transform: Optional[Callable] = None,
                 verify: bool = False, cache_mb: float = 256):
        self.dataset_dir = Path(dataset_dir)
        self.manifest, self.files = verify_and_list(self.dataset_dir, split, verify=verify)
        self.split, self.transform, self.pixel_max = split, transform, self.manifest["pixel_max"]
        self.cache_bytes = int(cache_mb * 2**20)
        self.groups, self.starts, start = [], [], 0  # (file, row group), first row of each
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                self.groups.append((f, g))
                self.starts.append(start)
                start += meta.row_group(g).num_rows
        self.length = start
        self.starts_array = np.asarray(self.starts, np.int64)  # for batched lookups
        self._reset()

    def _reset(self) -> None:
        self._open: dict[int, pq.ParquetFile] = {}
        self._cache: collections.OrderedDict[int, _RowGroup] = collections.OrderedDict()
        self._cached = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_open", "_cache", "_cached"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.length

    def group_of(self, index: int) -> int:
        return bisect.bisect_right(self.starts, index) - 1

    def _group(self, g: int) -> "_RowGroup":
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        f, rg = self.groups[g]
        if f not in self._open:
            self._open[f] = pq.ParquetFile(self.files[f])
        entry = _RowGroup(self._open[f].read_row_group(rg, columns=_COLUMNS))
        self._cache[g] = entry
        self._cached += entry.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return entry

    def _check(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images in split {self.split!r}")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        self._check(index)
        g = self.group_of(index)
        group, row = self._group(g), index - self.starts[g]
        x = to_float(group.pixels(row), self.pixel_max)
        return (x if self.transform is None else self.transform(x)), int(group.labels[row])

    def pixels(self, indices) -> tuple[list[np.ndarray], np.ndarray]:
        """The stored pixels of rows `indices`: (H, W, C) arrays (in [0, pixel_max]) and labels."""
        return self._pixels(indices)[:2]

    def _pixels(self, indices) -> tuple[list[np.ndarray], np.ndarray, bool]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.length)]
        if bad.size:
            self._check(int(bad[0]))
        groups = np.searchsorted(self.starts_array, idx, side="right") - 1
        # One stable sort by row group: each group is read once, in file order, whatever the
        # order of `indices` (a random subset touches many groups; a range, a few).
        order = np.argsort(groups, kind="stable")
        present, first = np.unique(groups[order], return_index=True)
        pixels, labels = [None] * len(idx), np.empty(len(idx), np.int64)
        all_raw = True
        for g, at in zip(present, np.split(order, first[1:])):
            group, rows = self._group(int(g)), idx[at] - self.starts[g]
            labels[at] = group.labels[rows]
            all_raw &= group.array is not None
            for k, p in zip(at, group.take(rows)):
                pixels[k] = p
        return pixels, labels, all_raw

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, int]]:
        """A DataLoader batch in one call: rows of one size are converted as one array."""
        pixels, labels, all_raw = self._pixels(indices)
        # Small raw rows convert as one array; decoded images one by one (a strided copy of a
        # whole batch of large images is slower than converting each while it is in cache).
        if all_raw and pixels and len({p.shape for p in pixels}) == 1:
            images = list(to_float(np.stack(pixels), self.pixel_max))
        else:
            images = [to_float(p, self.pixel_max) for p in pixels]
        if self.transform is not None:
            images = [self.transform(x) for x in images]
        return list(zip(images, labels.tolist()))

    def squared(self, lo: int, hi: int, *, image_size: int, channels: int,
                resize: int | None = None) -> tuple[Tensor, Tensor]:
        """Rows [lo, hi) as images (n, channels, image_size, image_size) float32 in [-1, 1]
        (shorter side resized to `resize`, default image_size, centre-cropped, channels
        matched) and labels (n,)."""
        return self.squared_at(range(lo, hi), image_size=image_size, channels=channels, resize=resize)

    def squared_at(self, indices, *, image_size: int, channels: int,
                   resize: int | None = None) -> tuple[Tensor, Tensor]:
        """`squared` of rows `indices` (n,), in that order; each row group is read once."""
        pixels, labels = self.pixels(indices)
        squared = [match_channels(square_pixels(p, image_size, resize), channels) for p in pixels]
        stacked = np.stack(squared) if squared else np.zeros((0, image_size, image_size, channels), np.uint8)
        return to_float(stacked, self.pixel_max), torch.from_numpy(labels)

    def pixel_batch(self, indices, *, image_size: int, channels: int,
                    full_resolution: bool = False) -> tuple[Tensor | list[Tensor], Tensor]:
        """Rows `indices` (n,) as stored, for the device to convert: (n, channels, image_size,
        image_size) uint8 in [0, pixel_max] squared as `squared_at` does; with
        `full_resolution` (an augmentation that crops any size) only the channels are matched
        and each image keeps its size: a list of n (channels, H_i, W_i), stacked when they
        share one. Labels (n,) int64."""
        pixels, labels = self.pixels(indices)
        if full_resolution:
            pixels = [match_channels(p, channels) for p in pixels]
        else:
            pixels = [match_channels(square_pixels(p, image_size), channels) for p in pixels]
        if not pixels:
            return torch.zeros((0, channels, image_size, image_size), dtype=torch.uint8), torch.from_numpy(labels)
        if len({p.shape for p in pixels}) == 1:  # one (H, W, C) -> (C, H, W) copy for the batch
            return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
        return [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1))) for p in pixels], torch.from_numpy(labels)


def square_pixels(image: np.ndarray, size: int, resize: int | None = None) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C): shorter side to `resize` (default `size`;
    antialiased bilinear), then the centre size x size crop. resize=256, size=224 is the
    ImageNet evaluation transform Resize(256) + CenterCrop(224)."""
    import torch.nn.functional as F

    resize = resize or size
    if resize < size:
        raise UserError(f"resize must be >= size: the shorter side {resize} cannot hold a {size} px crop")
    h, w = image.shape[:2]
    if (h, w) == (size, size) and resize == size:
        return image
    scale = resize / min(h, w)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(max(resize, round(h * scale)), max(resize, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def resize_centre_crop(images: Tensor, resize: int | None) -> Tensor:
    """(n, C, S, S) -> (n, C, S, S): resized to `resize` (bilinear, antialiased) and the centre
    S x S kept, `square_pixels` for images already square in memory; None: unchanged."""
    import torch.nn.functional as F

    size = images.shape[-1]
    if resize is None or resize == size:
        return images
    if resize < size:
        raise UserError(f"resize must be >= the images' size {size}, got {resize}")
    x = F.interpolate(images.float(), size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
    lo = (resize - size) // 2
    return x[..., lo : lo + size, lo : lo + size].clamp(-1, 1)


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, c) -> (H, W, channels): grey repeated to RGB, RGB averaged to grey (ITU-R 601)."""
    if image.shape[2] == channels:
        return image
    if image.shape[2] == 1:
        return np.repeat(image, channels, axis=2)
    if channels == 1:
        grey = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return grey.round().clip(0, 255).astype(np.uint8)[..., None]
    raise UserError(f"cannot turn {image.shape[2]}-channel images into {channels} channels")


class _RowGroup:
    """One row group in memory: raw rows of one size as one (n, H, W, C) array, encoded
    rows as their bytes, decoded only when read (a random read decodes one image, not
    the group)."""

    def __init__(self, table: pa.Table):
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.array = _raw_array(table)
        self.table = None if self.array is not None else table
        self.nbytes = self.array.nbytes if self.array is not None else table.nbytes

    def pixels(self, row: int) -> np.ndarray:
        return self.array[row] if self.array is not None else _decode_row(self.table, row)

    def take(self, rows: np.ndarray) -> list[np.ndarray] | np.ndarray:
        return self.array[rows] if self.array is not None else [self.pixels(int(r)) for r in rows]


class RowGroupSampler(Sampler[int]):
    """Shuffles row groups, then items within windows of `window` groups, and gives each of
    `num_replicas` ranks a contiguous, equally long part (padded by repetition, like
    DistributedSampler): each rank decodes each of its row groups about once per epoch."""

    def __init__(self, dataset: ShardDataset, *, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, window: int = 4):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
        self.dataset, self.shuffle, self.seed, self.window = dataset, shuffle, seed, window
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.per_rank = -(-len(dataset) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        ds = self.dataset
        bounds = [*ds.starts, len(ds)]
        groups = np.arange(len(ds.groups))
        rng = np.random.default_rng(seeds.row_group_order(self.seed, self.epoch))
        if self.shuffle:
            groups = rng.permutation(groups)
        parts = []
        for w in range(0, len(groups), self.window):
            idx = np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in groups[w : w + self.window]])
            parts.append(rng.permutation(idx) if self.shuffle else idx)
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        pad = self.per_rank * self.num_replicas - len(order)
        return np.concatenate([order, order[:pad]]) if pad else order

    def __iter__(self) -> Iterator[int]:
        mine = self._order()[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.per_rank


def load_pixels(dataset_dir: str | Path, split: str, *, verify: bool = False) -> tuple[Tensor, Tensor, int]:
    """A whole split in memory as stored: pixels (N, C, H, W) uint8 in [0, pixel_max], labels
    (N,) and the manifest's pixel_max."""
    dataset_dir = Path(dataset_dir)
    manifest, files = verify_and_list(dataset_dir, split, verify=verify)
    sizes = manifest["splits"][split]["image_sizes"]
    if len(sizes) != 1:
        raise ShardError(f"split {split!r} of {dataset_dir} mixes image sizes {sorted(sizes)}: it cannot be held as "
                         "one tensor; read it with ShardDataset and a resizing transform")
    parts = [decode_table(pq.read_table(f, columns=_COLUMNS)) for f in files]
    parts = [p for p in parts if len(p[1])] or [(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64))]
    pixels, labels = zip(*parts)
    chw = torch.from_numpy(np.concatenate(pixels)).permute(0, 3, 1, 2).contiguous()
    return chw, torch.from_numpy(np.concatenate(labels)), manifest["pixel_max"]


def load_split(dataset_dir: str | Path, split: str, *, verify: bool = False) -> tuple[Tensor, Tensor]:
    """A whole split in memory: images (N, C, H, W) float32 in [-1, 1] and labels (N,)."""
    pixels, labels, pixel_max = load_pixels(dataset_dir, split, verify=verify)
    return pixels_as_float(pixels, pixel_max), labels


IN_MEMORY_LIMIT_GB = 16.0


def _held_out(dataset_dir: Path, splits: dict) -> str:
    held_out = next((s for s in ("test", "val", "validation", "valid") if s in splits), None)
    if "train" not in splits or held_out is None:
        raise ShardError(f"{dataset_dir} has splits {sorted(splits)}; training needs 'train' and a held-out "
                         "split ('test' or 'val')")
    return held_out


def in_memory_problem(dataset_dir: str | Path, *, image_size: int, channels: int) -> str | None:
    """Why the train and held-out splits cannot be held in memory at the task's image size
    (mixed or other sizes, or over IN_MEMORY_LIMIT_GB as stored, uint8: `load_pixel_split`);
    None when they can."""
    dataset_dir = Path(dataset_dir)
    splits = read_manifest(dataset_dir)["splits"]
    held_out = _held_out(dataset_dir, splits)
    expected = f"{image_size}x{image_size}x{channels}"
    for split in ("train", held_out):
        sizes = splits[split]["image_sizes"]
        if set(sizes) != {expected}:
            return (f"the task expects {expected} images (data.image_size, data.channels) but split "
                    f"{split!r} of {dataset_dir} holds {sorted(sizes)[:5]}{' ...' if len(sizes) > 5 else ''}")
    gb = sum(splits[s]["rows"] for s in ("train", held_out)) * image_size**2 * channels / 1e9  # 1 byte a value
    if gb > IN_MEMORY_LIMIT_GB:
        return f"{dataset_dir} would take {gb:.0f} GB in memory as uint8 (limit {IN_MEMORY_LIMIT_GB:.0f})"
    return None


def load_pixel_split(dataset_dir: str | Path, *, image_size: int, channels: int) -> PixelSplit:
    """The train split and the held-out split (test, or val) in memory as uint8, checked
    against the task's image size and channels."""
    dataset_dir = Path(dataset_dir)
    problem = in_memory_problem(dataset_dir, image_size=image_size, channels=channels)
    if problem:
        raise ShardError(f"{problem}: the in-memory trainer cannot hold it; stream it (data.loader=stream: "
                         "Ray Data on backend=ray, a DataLoader over the shards on torchrun) or read it with "
                         "ShardDataset")
    held_out = _held_out(dataset_dir, read_manifest(dataset_dir)["splits"])
    (train, train_labels, pixel_max), (test, test_labels, _) = (load_pixels(dataset_dir, s)
                                                                for s in ("train", held_out))
    return PixelSplit(train, train_labels, test, test_labels, pixel_max)


def load_training_split(dataset_dir: str | Path, *, image_size: int, channels: int) -> ImageSplit:
    """`load_pixel_split` as float32 images in [-1, 1] (metrics and tests; training holds the
    uint8 split)."""
    split = load_pixel_split(dataset_dir, image_size=image_size, channels=channels)
    return ImageSplit(split.train_images[:], split.train_labels, split.test_images[:], split.test_labels)
