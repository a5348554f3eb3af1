"""Read throughput (images/s) of prepared Parquet shards vs decoding the same images from
a PNG image folder with PIL (torchvision's ImageFolder), each through a torch DataLoader
with shuffling, at 32x32 and 256x256.

Both sides return the same tensors: (C, H, W) float32 in [-1, 1] with the label. Each
epoch starts fresh DataLoader workers (no cache carried over); the best of the epochs is
reported. Shards are read in the order RowGroupSampler gives (row groups shuffled, items
shuffled within a window) and in a fully random order; in the main process (raw rows
convert a whole batch as one array, so worker processes add more IPC than they save) and
with worker processes (what decoding PNG/JPEG rows needs).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.report import table

OUT = Path("bench-results")


def _make_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """n smooth-plus-noise RGB images (realistic PNG sizes) in 10 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(3)], -1)
        img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape) + 0.1 * yy[..., None]).clip(0, 1) * 255)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:06d}.png")


def _folder_dataset(root: Path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    return ImageFolder(str(root), transform=to_float)


def _epoch_rate(dataset, sampler, *, batch: int, workers: int, epochs: int) -> float:
    best = 0.0
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += len(images)
        best = max(best, seen / (time.perf_counter() - start))
    return best


def measure(size: int, n: int, *, workers: int = 2, batch: int = 128, epochs: int = 2) -> list[dict]:
    from torch.utils.data import RandomSampler

    from lzn.data.prepare import PrepareConfig, prepare_dataset
    from lzn.data.reader import RowGroupSampler, ShardDataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _make_folder(tmp / "png", n, size)
        png_mb = sum(p.stat().st_size for p in (tmp / "png").rglob("*.png")) / 2**20
        folder = _folder_dataset(tmp / "png")
        baseline = _epoch_rate(folder, RandomSampler(folder), batch=batch, workers=workers, epochs=epochs)
        rows.append({"size": f"{size}x{size}", "images": n, "reader": "PNG folder (PIL)", "workers": workers,
                     "stored": "png",
                     "MB": png_mb, "img/s": baseline, "speedup": 1.0})
        variants = [("as stored", PrepareConfig(executor="process"))]
        if size > PrepareConfig().raw_max_side:
            variants.append(("raw pixels", PrepareConfig(executor="process", raw_max_side=size)))
        for label, cfg in variants:
            out = tmp / f"shards-{cfg.raw_max_side}"
            prepare_dataset("imagefolder", str(tmp / "png"), out, cfg, progress=False)
            ds = ShardDataset(out, "train")
            mb = sum(f.stat().st_size for f in ds.files) / 2**20
            stored = next(iter(ds.manifest["splits"]["train"]["encodings"]))
            for order, sampler, w in (("row groups", RowGroupSampler(ds), 0), ("row groups", RowGroupSampler(ds), workers),
                                      ("random", RandomSampler(ds), 0), ("random", RandomSampler(ds), workers)):
                rate = _epoch_rate(ds, sampler, batch=batch, workers=w, epochs=epochs)
                rows.append({"size": f"{size}x{size}", "images": n, "reader": f"shards, {order} order",
                             "workers": w, "stored": stored, "MB": mb, "img/s": rate, "speedup": rate / baseline})
    return rows


def main(quick: bool = False) -> None:
    from benchmarks import data_stream

    plan = [(32, 2000), (256, 200)] if quick else [(32, 20000), (256, 2000)]
    rows = []
    for size, n in plan:
        rows += measure(size, n)
        print(table(rows), flush=True)
    print(f"\nRead throughput through a torch DataLoader (batch 128, best of 2 epochs, "
          f"{torch.get_num_threads()} threads):")
    print(table(rows))
    steps = data_stream.measure(quick=quick)
    print("\nStep time, gen_digits on 1 Ray Train worker: data.loader=stream (Ray Data, one execution "
          "for every pass) vs memory (best of 2 runs, without checkpoints)")
    print(table(steps))
    OUT.mkdir(exist_ok=True)
    path = OUT / "data.json"
    path.write_text(json.dumps({"read": rows, "streamed_step": steps}, indent=2))
    print(f"\nwrote {path}")
