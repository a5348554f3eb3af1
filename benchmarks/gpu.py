"""`python -m benchmarks gpu`: the hot path on one CUDA device.

- Zoning: compute_latents + alignment_loss (20 + 20 Euler steps) forward and backward at
  B = N = 8192, q = 256, and its share of the device's IEEE float32 GEMM rate (TF32 off, as
  inside lzn.zoning), measured on the same GEMM shapes in the same process, interleaved.
- Training steps of gen_cifar10 and repr_imagenet at the paper's per-GPU batch (CIFAR10:
  2000 on 16 GPUs = 125; ImageNet: 8192 on 128 = 64), fp32 and bf16 autocast for the
  networks (with hardware=gpu's TF32, channels_last and cudnn.benchmark): step time and
  images/s per GPU. One device stands in for a rank of the paper's
  allocation: the anchors of the other ranks are this rank's, repeated (detached), so the
  zoning runs at the global N as on the cluster; the all-gather's communication and the
  gradient all-reduce are not part of this number. Inputs are uint8 batches (CIFAR10: 32 px;
  ImageNet: full-resolution 375x500 images, cropped and augmented on the device).
Writes bench-results/gpu.json. Needs a CUDA device; says so and stops without one.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.report import table

OUT = Path("bench-results")
ROOT = Path(__file__).resolve().parents[1]
PAPER_PER_GPU = {"gen_cifar10": (125, 16), "repr_imagenet": (64, 128)}  # (per-GPU batch, GPUs)


def _cuda_seconds(fn, repeats: int) -> float:
    """Best of `repeats` timed calls of fn on the device (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def zoning_row(n: int = 8192, q: int = 256, repeats: int = 3) -> dict:
    from benchmarks.zoning import STEPS, _our_gemm_flops, ours
    from lzn.posterior import chunk_size

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    view1 = torch.randn(n, q, device=dev, generator=g).requires_grad_()
    view2 = (view1.detach() + 0.3 * torch.randn(n, q, device=dev, generator=g)).requires_grad_()
    noise, targets = torch.randn(n, q, device=dev, generator=g), torch.arange(n, device=dev)

    def step():
        ours(view1, noise, view2, targets).backward()
        view1.grad = view2.grad = None

    c = chunk_size(n, n, None)
    mats = [(torch.randn(a, k, device=dev), torch.randn(k, b, device=dev))
            for a, k, b in ((n, q, c), (n, c, q), (c, n, q))]

    def gemms():
        for a, b in mats:
            torch.mm(a, b)

    gemm_flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in mats)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the rate lzn.zoning can reach: IEEE float32
    try:
        ours_s, gemm_s = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved, best of each
            gemm_s = min(gemm_s, _cuda_seconds(gemms, 3))
            ours_s = min(ours_s, _cuda_seconds(step, 1))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    rate = gemm_flops / gemm_s
    ours_rate = _our_gemm_flops(n, q) / ours_s
    return {"work": f"zoning B=N={n} q={q} ({STEPS}+{STEPS} Euler, fwd+bwd)", "seconds": ours_s,
            "tflops": ours_rate / 1e12, "fp32_gemm_tflops": rate / 1e12, "pct_of_gemm": 100 * ours_rate / rate}


def _task(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipelines.config import to_run_config

    with initialize_config_dir(config_dir=str(ROOT / "pipelines" / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[f"task={name}", *overrides]))


def _images(task, per_gpu: int, dev: torch.device):
    """uint8 pixels a step of `task` starts from: (B, C, S, S), or full-resolution images
    for a cropping augmentation."""
    from lzn.data.augment import crops_any_size

    d = task.data
    g = torch.Generator().manual_seed(0)
    if crops_any_size(d.augment):
        return [torch.randint(0, 256, (d.channels, 375, 500), dtype=torch.uint8, generator=g).pin_memory()
                for _ in range(per_gpu)]
    return torch.randint(0, 256, (per_gpu, d.channels, d.image_size, d.image_size), dtype=torch.uint8,
                         generator=g).pin_memory()


def step_row(name: str, bf16: bool, steps: int = 10) -> dict:
    from lzn.data.batches import StepBatcher
    from lzn.hardware import HardwareConfig, apply_hardware
    from lzn.task import TWO_VIEW_OBJECTIVES, build_objective
    from lzn.trainer import Trainer

    per_gpu, world = PAPER_PER_GPU[name]
    dev = torch.device("cuda")
    cfg = _task(name, [f"train.batch_size={per_gpu}", f"train.bf16={str(bf16).lower()}", "train.progress=false"])
    gather = lambda t: torch.cat([t, t.detach().repeat(world - 1, 1)])  # noqa: E731  the global N
    torch.manual_seed(0)
    objective = build_objective(cfg, gather).to(dev)
    # hardware=gpu's settings (pipelines/conf/hardware/gpu.yaml), compile off
    apply_hardware(objective, HardwareConfig(tf32=True, channels_last=True, cudnn_benchmark=True), dev)
    d = cfg.data
    batcher = StepBatcher(global_batch=per_gpu, seed=0, augment=d.augment, image_size=d.image_size,
                          two_view=cfg.objective in TWO_VIEW_OBJECTIVES, device=dev, pixel_max=255)
    images, labels = _images(cfg, per_gpu, dev), torch.zeros(per_gpu, dtype=torch.long).pin_memory()
    with tempfile.TemporaryDirectory(prefix="lzn-bench-gpu-") as run_dir:
        trainer = Trainer(objective, cfg.optim, cfg.train, lambda step: batcher(images, labels, step),
                          run_dir=run_dir, device=dev, progress=False)
        seconds = _cuda_seconds(lambda: [trainer.train_step() for _ in range(steps)], 2) / steps
    return {"work": f"{name} step, {per_gpu} images/GPU ({per_gpu * world} on {world})",
            "precision": "bf16" if bf16 else "fp32", "seconds": seconds, "img_per_s_per_gpu": per_gpu / seconds,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(quick: bool = False) -> None:
    if not torch.cuda.is_available():
        print("benchmarks gpu needs a CUDA device; none is visible here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return
    rows = [zoning_row(4096 if quick else 8192, 256)]
    print(table(rows), flush=True)
    for name in PAPER_PER_GPU:
        for bf16 in (False, True):
            torch.cuda.reset_peak_memory_stats()
            rows.append(step_row(name, bf16, steps=3 if quick else 10))
            print(table(rows[-1:]), flush=True)
    print(f"\nGPU hot path on {torch.cuda.get_device_name()} (torch {torch.__version__}):")
    print(table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {OUT / 'gpu.json'}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
