"""The training hot path on this machine: host syncs per step, the input pipeline's
throughput, and the step time of each backend on the same work.

- `syncs_per_step`: tensor-to-host conversions (`Tensor.item`, `__bool__`, `__float__`,
  `__int__`, `tolist`, `numpy`, `cpu`) made by the project's own code (lzn, orchestration,
  pipelines) per training step between two log points, counted on a real Trainer of the
  gen_digits and repr_digits tasks (the log points' own all-reduce and the checkpoints are
  not counted: they happen every `log_every` / `checkpoint_every` steps by design). On a GPU
  each one waits for the device to drain its queue.
- `augment_speedup`: two-view SimCLR augmentation at 224 px of full-resolution images,
  batched (one call over the batch, what the trainer runs; on a CPU device it works image
  by image inside, lzn.data.image_ops) over per-sample (torchvision v2 in a Python loop,
  the previous implementation), in images/s, one thread each, the two measured in turn
  (best of 3 each) so that load on a shared machine slows both.
- `input_img_per_s_per_core`: JPEG decode + two-view SimCLR augmentation + float tensor,
  images/s on one thread (`torch.set_num_threads(1)`).
- the step time of the local, torchrun (2 x 1) and Ray Train (2 x 1) backends on gen_digits
  (`benchmarks.train`'s runs: the trainer's own clock, checkpoints excluded).
Writes bench-results/hotpath.json.
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import table

OUT = Path("bench-results")
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / p) for p in ("lzn", "orchestration", "pipelines"))
CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


class HostConversions:
    """Counts calls of `CONVERSIONS` on tensors whose caller is a file under `roots` while
    `counting` is true; the patched methods are restored on exit."""

    def __init__(self, roots: tuple[str, ...] = PROJECT):
        self.roots, self.counting, self.calls = roots, False, []
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, original):
        def method(tensor, *args, **kwargs):
            if self.counting:
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(self.roots):
                    self.calls.append(f"{name} at {caller.co_filename}:{caller.co_name}")
            return original(tensor, *args, **kwargs)
        return method

    def __enter__(self) -> "HostConversions":
        for name in CONVERSIONS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _task(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipelines.config import to_run_config

    with initialize_config_dir(config_dir=str(ROOT / "pipelines" / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[f"task={name}", *overrides]))


def syncs_per_step(task: str, steps: int = 20, log_every: int = 10) -> tuple[float, list[str]]:
    """Conversions per step between log points of `steps` steps of `task` (digits, batch 64),
    and where they came from."""
    from lzn.data.batches import make_batches
    from lzn.data.digits import digits_split
    from lzn.task import TWO_VIEW_OBJECTIVES, build_objective
    from lzn.trainer import Trainer

    cfg = _task(task, ["train.batch_size=64", "latent.steps=4", "align.steps=5"])
    cfg.train.iterations, cfg.train.log_every, cfg.train.progress = steps, log_every, False
    cfg.train.checkpoint_every = steps
    torch.manual_seed(0)
    split = digits_split()
    objective = build_objective(cfg)
    batches = make_batches(split.train_images, split.train_labels, global_batch=cfg.train.batch_size,
                           seed=cfg.train.seed, augment=cfg.data.augment,
                           two_view=cfg.objective in TWO_VIEW_OBJECTIVES)
    with tempfile.TemporaryDirectory(prefix="lzn-bench-hotpath-") as run_dir, HostConversions() as counter:
        trainer = Trainer(objective, cfg.optim, cfg.train, batches, run_dir=run_dir, progress=False)

        def paused(method):
            def run(*args, **kwargs):  # a log point or a checkpoint: syncs there are by design
                counter.counting = False
                try:
                    return method(*args, **kwargs)
                finally:  # after the last log point comes the run's summary, not a step
                    counter.counting = trainer.step < cfg.train.iterations
            return run

        trainer._report, trainer.save = paused(trainer._report), paused(trainer.save)
        trainer.resume = lambda: False  # a fresh run in a fresh folder
        counter.counting = True
        trainer.fit()
        counter.counting = False
    return len(counter.calls) / steps, sorted(set(counter.calls))


def _jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """n smooth RGB images of size (H, W) as JPEG bytes (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        base = np.stack([np.sin(8 * xx * rng.uniform(0.5, 2) + 5 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6))
                         for _ in range(3)], -1)
        img = ((base * 0.4 + 0.5 + rng.normal(0, 0.03, base.shape)).clip(0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _best_rate(fn, items: int, repeats: int) -> float:
    """items/s of the fastest of `repeats` calls of fn (after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return items / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def input_rate(batch: int = 64, size: int = 224, source: tuple[int, int] = (300, 400), repeats: int = 3) -> float:
    """Images/s on one thread: JPEG decode to uint8, then the trainer's StepBatcher (to float
    on the device, two-view SimCLR augmentation batched there)."""
    from torchvision.io import decode_jpeg

    from lzn.data.batches import StepBatcher

    files = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in _jpegs(batch, source)]
    batcher = StepBatcher(global_batch=batch, seed=0, augment="simclr", image_size=size, two_view=True)
    labels = torch.zeros(batch, dtype=torch.long)

    def run():
        batcher([decode_jpeg(f) for f in files], labels, 0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_rate(run, batch, repeats)
    finally:
        torch.set_num_threads(threads)


def augment_speedup(batch: int = 64, size: int = 224, source: tuple[int, int] = (300, 400)) -> tuple[float, float]:
    """(batched, per-sample) two-view SimCLR images/s on one thread, measured in turn, best of 3 each."""
    from benchmarks.augment import interleaved_throughput

    return interleaved_throughput(batch=batch, size=size, source=source)


def backend_steps(iterations: int) -> dict[str, float]:
    """Step ms of gen_digits on the local (1 x 2 threads), torchrun (2 x 1) and Ray (2 x 1) backends."""
    from benchmarks import train as bench_train
    from orchestration.mlflow.server import local_server, stop_local_server

    out_ms = {}
    with tempfile.TemporaryDirectory(prefix="lzn-bench-hotpath-") as tmp:
        out = Path(tmp)
        uri = local_server(out / "mlflow")
        try:
            for backend in ("local", "torchrun", "ray"):
                m = bench_train._run(out, uri, backend, iterations, f"hotpath-{backend}", 50)
                out_ms[backend] = bench_train._step_ms(m)
        finally:
            stop_local_server(out / "mlflow")
    return out_ms


def main(quick: bool = False) -> None:
    result: dict = {}
    for task in ("gen_digits", "repr_digits"):
        per_step, where = syncs_per_step(task, steps=10 if quick else 20, log_every=5 if quick else 10)
        result[f"syncs_per_step {task}"] = per_step
        if where:
            print(f"host conversions in {task}'s steps:\n  " + "\n  ".join(where))
    batch = 16 if quick else 64
    batched, per_sample = augment_speedup(batch=batch)
    result.update(augment_batched_img_s=batched, augment_per_sample_img_s=per_sample,
                  augment_speedup=batched / per_sample)
    result["input_img_per_s_per_core"] = input_rate(batch=batch)
    for backend, ms in backend_steps(30 if quick else 200).items():
        result[f"step_ms {backend}"] = ms
    rows = [{"measure": k, "value": v} for k, v in result.items()]
    print(f"\nHot path ({'quick' if quick else 'full'}; augmentation: two views at 224 px from 300x400 "
          f"JPEGs, batch {batch}, one thread; step ms: gen_digits, global batch 128, 2 workers x 1 thread "
          "for torchrun and ray)")
    print(table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "hotpath.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT / 'hotpath.json'}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
