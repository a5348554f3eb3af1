"""Latent computation + alignment, forward and backward: lzn.zoning vs the reference code's
formulation, GEMM efficiency, and zone round-trip accuracy per solver.

The baseline is the reference implementation's formulation, written here: every Euler
step materialises the (B, N, q) difference tensor and is wrapped in per-step gradient
checkpointing. Each timing runs in its own subprocess so peak memory (the rise in peak
RSS over the process's baseline) belongs to that configuration alone.

GEMM efficiency compares our run with the matmul limit of that very run: the GEMMs it
performs (recorded at the dispatcher, backward included) replayed as bare torch.mm, timed
in the same process, interleaved with ours (limit, ours, limit, ours, ...), best of each.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from benchmarks.report import table

STEPS, CUTOFF, EPS = 20, 0.2, 1e-3
OUT = Path("bench-results")
# The baseline's largest live tensors are a few (B, N, q) float32 blocks; above this it
# would not fit on a 24 GB machine.
BASELINE_MAX_ELEMENTS = 1024 * 1024 * 256


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ baseline (reference)
def _ref_mean(x, anchors, tau):
    diff = x[:, None, :] - (1 - tau) * anchors[None]  # (B, N, q)
    p = torch.softmax(-(diff**2).sum(-1) / (2 * tau**2), dim=1)
    return (p[:, :, None] * anchors[None]).sum(dim=1), p


def _ref_euler_step(x, anchors, tau, dtau):
    m, _ = _ref_mean(x, anchors, tau)
    return x + dtau * (x - m) / tau


def _ref_reverse_step(x, anchors, tau, dtau, targets):
    """One reverse Euler step and log P(target) at its start, from one evaluation (the reference's pdfs)."""
    m, p = _ref_mean(x, anchors, tau)
    return x - dtau * (x - m) / tau, torch.log(p[torch.arange(len(targets)), targets] + 1e-30)


def baseline(anchors, noise, targets_anchors, targets):
    taus = [EPS + (1 - EPS) * k / STEPS for k in range(STEPS + 1)]
    x = (1 - EPS) * anchors + EPS * noise
    for k in range(STEPS):
        x = checkpoint(_ref_euler_step, x, anchors, taus[k], taus[k + 1] - taus[k], use_reentrant=False)
    # The reference's reverse run: tau = 1 -> 0 in steps of 1/n, P recorded before each step.
    y, best = x, None
    for k in range(STEPS):
        y, lp = checkpoint(_ref_reverse_step, y, targets_anchors, 1 - k / STEPS, 1 / STEPS, targets,
                           use_reentrant=False)
        if k >= int(CUTOFF * STEPS):
            best = lp if best is None else torch.maximum(best, lp)
    return -best.mean()


def ours(anchors, noise, targets_anchors, targets):
    from lzn.zoning import alignment_loss, compute_latents

    z = compute_latents(anchors, noise, steps=STEPS, solver="euler", eps=EPS)
    loss, _ = alignment_loss(z, targets_anchors, targets, steps=STEPS, cutoff=CUTOFF, eps=EPS)
    return loss


class _GemmRecorder(TorchDispatchMode):
    """Records every GEMM that runs under it, autograd's backward included: its operands'
    shapes and strides, so that a transposed view is replayed as one."""

    OPS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)

    def __init__(self):
        super().__init__()
        self.gemms: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in self.OPS:
            a, b = args[:2] if packet is torch.ops.aten.mm else args[1:3]
            self.gemms.append((tuple(a.shape), a.stride(), tuple(b.shape), b.stride()))
        elif packet in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.addmv):
            raise NotImplementedError(f"{func} in lzn.zoning: count and replay it here too")
        return func(*args, **(kwargs or {}))


def _our_gemm_flops(gemms: list[tuple]) -> float:
    """The GEMM flops lzn.zoning really performed: 2 m k n for each recorded (m, k)(k, n).

    For Euler with 20 + 20 steps that is 2 GEMM-equivalents (2 B N q flops each) per
    posterior evaluation forward and 5 backward (3 for the alignment's last step, whose mean
    gets no gradient), and 1 for the accuracy's nearest-anchor search: 279. (Before the
    kernel ran over blocks of whole rows, its row term took a second pass over anchor
    chunks, 2 more per evaluation: 357 at B = N = 4096.) `lzn.posterior._PosteriorMean`
    says which GEMMs run.
    """
    return sum(2.0 * sa[0] * sa[1] * sb[1] for sa, _, sb, _ in gemms)


def _replayer(gemms: list[tuple]):
    """A function running exactly the recorded GEMMs (same shapes, operand layouts and
    order) as bare torch.mm into preallocated outputs: the matmul limit of our run."""
    buffers: dict[tuple, tuple] = {}
    for key in gemms:
        if key not in buffers:
            sa, ta, sb, tb = key
            buffers[key] = (torch.empty_strided(sa, ta).normal_(), torch.empty_strided(sb, tb).normal_(),
                            torch.empty(sa[0], sb[1]))
    calls = [buffers[key] for key in gemms]

    def replay():
        for a, b, out in calls:
            torch.mm(a, b, out=out)

    return replay


def _one(impl: str, n: int, q: int, rounds: int) -> dict:
    """Time forward+backward of one configuration in this (fresh) process, best of `rounds`.

    A first untimed run warms up and records our GEMMs. Then each round replays those GEMMs
    (the matmul limit) and runs ours: interleaved in one process, so that other work on a
    shared machine slows both alike, and the best of each is compared.
    """
    torch.manual_seed(0)
    view1 = torch.randn(n, q)
    view2 = (view1 + 0.3 * torch.randn(n, q)).requires_grad_()
    view1.requires_grad_()
    noise, targets = torch.randn(n, q), torch.arange(n)
    fn = ours if impl == "ours" else baseline

    def run() -> float:
        t0 = time.perf_counter()
        fn(view1, noise, view2, targets).backward()
        seconds = time.perf_counter() - t0
        view1.grad = view2.grad = None
        return seconds

    base_rss = _rss_bytes()
    if impl != "ours":
        times = [run() for _ in range(rounds)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        return {"impl": impl, "B=N": n, "q": q, "seconds": min(times), "peak_mem_gb": peak / 2**30}
    recorder = _GemmRecorder()
    with recorder:
        run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    replay, limit, times = _replayer(recorder.gemms), [], []
    replay()  # warm-up
    for _ in range(rounds):
        t0 = time.perf_counter()
        replay()
        limit.append(time.perf_counter() - t0)
        times.append(run())
    return {"impl": impl, "B=N": n, "q": q, "seconds": min(times), "peak_mem_gb": peak / 2**30,
            "limit_seconds": min(limit), "gemm_flops": _our_gemm_flops(recorder.gemms)}


def _run_child(impl: str, n: int, q: int, rounds: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.zoning", "--one", impl, str(n), str(q), str(rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def anchor_sets(n: int, q: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Isotropic anchors (random directions) and clustered ones (32 tight clusters, members
    5% of the norm apart), each at norms 3 and 30."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)
    iso = unit(torch.randn(n, q, generator=g))
    centres = unit(torch.randn(32, q, generator=g))[torch.randint(0, 32, (n,), generator=g)]
    clustered = unit(centres + 0.05 * unit(torch.randn(n, q, generator=g)))
    return {f"{kind} norm {norm}": base * norm for norm in (3, 30)
            for kind, base in (("isotropic", iso), ("clustered", clustered))}


def round_trip(n: int = 1024, q: int = 64, eps: float = EPS) -> list[dict]:
    """Share of anchors whose latent (alpha = 1) flows back to them, per solver and steps."""
    from lzn.zoning import assign_zones, compute_latents

    noise = torch.randn(n, q, generator=torch.Generator().manual_seed(1))
    rows = []
    for name, anchors in anchor_sets(n, q).items():
        for solver in ("euler", "dpm++2m", "dpm++3m"):
            row = {"anchors": name, "solver": solver}
            for steps in (10, 20, 40):
                z = compute_latents(anchors, noise, steps=steps, solver=solver, eps=eps)
                back = assign_zones(z, anchors, steps=steps, solver=solver, eps=eps)
                row[f"{steps} steps"] = (back == torch.arange(n)).float().mean().item()
            rows.append(row)
    return rows


def main(quick: bool = False) -> None:
    sizes = [256] if quick else [256, 1024, 4096]
    rows = []
    for q in (64, 256):
        for n in sizes:
            row = {"B=N": n, "q": q}
            mine = _run_child("ours", n, q, 3 if n >= 4096 else 5)
            row.update(ours_s=mine["seconds"], ours_peak_gb=mine["peak_mem_gb"])
            if n * n * q <= BASELINE_MAX_ELEMENTS:
                ref = _run_child("baseline", n, q, 1)
                row.update(baseline_s=ref["seconds"], baseline_peak_gb=ref["peak_mem_gb"],
                           speedup=ref["seconds"] / mine["seconds"])
            else:
                row.update(baseline_s="n/a (OOM)", baseline_peak_gb="n/a", speedup="n/a")
            # gemms: our GEMM flops in units of one (B, q) x (q, N) product; limit_s: the
            # same GEMMs as bare torch.mm, measured interleaved with ours.
            row.update(gemms=mine["gemm_flops"] / (2.0 * n * n * q), limit_s=mine["limit_seconds"],
                       gflops=mine["gemm_flops"] / mine["seconds"] / 1e9,
                       matmul_gflops=mine["gemm_flops"] / mine["limit_seconds"] / 1e9,
                       pct_of_matmul=100 * mine["limit_seconds"] / mine["seconds"])
            rows.append(row)
            print(table([row]), flush=True)
    trips = round_trip(256 if quick else 1024, 64)
    print(f"\nLatent computation + alignment, forward+backward, {STEPS} Euler steps, "
          f"{torch.get_num_threads()} threads:")
    print(table(rows))
    print(f"\nZone round trip (anchor -> latent -> anchor), B=N={256 if quick else 1024}, q=64, eps={EPS}:")
    print(table(trips))
    OUT.mkdir(exist_ok=True)
    path = OUT / "zoning.json"
    path.write_text(json.dumps({"timing": rows, "round_trip": trips}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        impl, n, q, rounds = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(_one(impl, n, q, rounds)))
    else:
        main(quick="--quick" in sys.argv)
