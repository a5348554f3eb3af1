"""Two-view SimCLR augmentation throughput: the batched pipeline against the per-sample one it replaced.

`interleaved_throughput` (`augment_throughput` of each side in turn, best of 3 each) is what
`benchmarks hotpath` reports as `augment_speedup` (batched / per-sample images/s, target
>= 5). The per-sample baseline is kept here, as it
ran in lzn.data.augment before the batched pipeline: torchvision's v2 Compose on each
image in a Python loop, each under its own seed. Run alone: `python -m benchmarks.augment`.
"""
from __future__ import annotations

import time

import torch
from torchvision.transforms import v2

from lzn import seeds
from lzn.data.augment import augment_batch, blur_kernel, build_augment


def per_sample_simclr(size: int) -> v2.Transform:
    """The replaced per-sample pipeline (images in [0, 1])."""
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.GaussianBlur(kernel_size=blur_kernel(size), sigma=(0.1, 2.0)),
    ])


def per_sample_views(transform: v2.Transform, images, *, seed: int, step: int, positions: torch.Tensor,
                     view: int) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1]: the replaced loop, one torch seed per sample."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for img, pos in zip(images, positions.tolist()):
            torch.manual_seed(seeds.augmentation(seed, step, pos, view))
            out.append(transform((img + 1) / 2).clamp(0, 1) * 2 - 1)
    return torch.stack(out)


def source_images(batch: int, source: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """`batch` images (3, H, W) in [-1, 1] of size `source` (H, W)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *source, generator=g) * 2 - 1 for _ in range(batch)]


def augment_throughput(batch: int = 64, size: int = 224, source: tuple[int, int] = (300, 400),
                       batched: bool = True, repeats: int = 3) -> float:
    """Images/s of two SimCLR views at `size` px of `batch` images of `source` (H, W) px,
    the best of `repeats` steps after one warm-up, on the CPU with torch's current threads.
    batched: the batched pipeline (lzn.data.augment's "simclr"), else the per-sample one."""
    images = source_images(batch, source)
    positions = torch.arange(batch)
    if batched:
        transform = build_augment("simclr", size)

        def views(step, view):
            return augment_batch(transform, images, seed=0, step=step, positions=positions, total=batch, view=view)
    else:
        transform = per_sample_simclr(size)

        def views(step, view):
            return per_sample_views(transform, images, seed=0, step=step, positions=positions, view=view)

    best = float("inf")
    for step in range(repeats + 1):
        t0 = time.perf_counter()
        for view in (0, 1):
            views(step, view)
        if step:  # step 0 warms up
            best = min(best, time.perf_counter() - t0)
    return batch / best


def interleaved_throughput(batch: int = 64, size: int = 224, source: tuple[int, int] = (300, 400),
                           rounds: int = 3) -> tuple[float, float]:
    """(batched, per-sample) images/s on one thread, each the best of `rounds` runs of
    `augment_throughput` taken in turn, so that a burst of load on a shared machine slows
    both sides rather than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = [0.0, 0.0]
        for _ in range(rounds):
            for side, batched in enumerate((True, False)):
                best[side] = max(best[side], augment_throughput(batch=batch, size=size, source=source,
                                                                batched=batched))
        return best[0], best[1]
    finally:
        torch.set_num_threads(threads)


def main(quick: bool = False) -> None:
    batch = 16 if quick else 64
    new, old = interleaved_throughput(batch=batch)
    print(f"two-view SimCLR, 224 px from 300x400, batch {batch}, one thread: batched {new:.1f} img/s, "
          f"per-sample {old:.1f} img/s, speedup {new / old:.1f}x")


if __name__ == "__main__":
    main()
