"""Latent computation + alignment, forward and backward: lzn.zoning vs the reference code's
formulation, GEMM efficiency, and zone round-trip accuracy per solver.

The baseline is the reference implementation's formulation, written here: every Euler
step materialises the (B, N, q) difference tensor and is wrapped in per-step gradient
checkpointing. Each timing runs in its own subprocess so peak memory (the rise in peak
RSS over the process's baseline) belongs to that configuration alone.
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


def _one(impl: str, n: int, q: int, repeats: int) -> dict:
    """Time forward+backward of one configuration in this (fresh) process."""
    torch.manual_seed(0)
    view1 = torch.randn(n, q)
    view2 = (view1 + 0.3 * torch.randn(n, q)).requires_grad_()
    view1.requires_grad_()
    noise, targets = torch.randn(n, q), torch.arange(n)
    fn = ours if impl == "ours" else baseline
    base_rss = _rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(view1, noise, view2, targets).backward()
        times.append(time.perf_counter() - t0)
        view1.grad = view2.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"impl": impl, "B=N": n, "q": q, "seconds": min(times), "peak_mem_gb": peak / 2**30}


def _matmul_gflops(n: int, q: int) -> float:
    """torch.mm GFLOP/s on the GEMM shapes lzn.zoning runs: (B, q)(q, c), (B, c)(c, q), (c, B)(B, q)."""
    from lzn.posterior import chunk_size as _chunk_size

    c = _chunk_size(n, n, None)
    shapes = [((n, q), (q, c)), ((n, c), (c, q)), ((c, n), (n, q))]
    flops = seconds = 0.0
    for sa, sb in shapes:
        a, b = torch.randn(*sa), torch.randn(*sb)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            torch.mm(a, b)
            reps += 1
        seconds += time.perf_counter() - t0
        flops += 2.0 * sa[0] * sa[1] * sb[1] * reps
    return flops / seconds / 1e9


def _our_gemm_flops(n: int, q: int) -> float:
    """GEMM flops lzn.zoning performs when one chunk holds every anchor: 2 per posterior
    evaluation forward, 5 backward (3 for the alignment's last step, whose posterior mean
    gets no gradient); several chunks recompute 2 more per evaluation for the row term."""
    evals = STEPS + STEPS
    return 2.0 * n * n * q * (7 * evals - 2)


def _run_child(impl: str, n: int, q: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.zoning", "--one", impl, str(n), str(q), str(repeats)]
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
            mine = _run_child("ours", n, q, 1 if n >= 4096 else 3)
            row.update(ours_s=mine["seconds"], ours_peak_gb=mine["peak_mem_gb"])
            if n * n * q <= BASELINE_MAX_ELEMENTS:
                ref = _run_child("baseline", n, q, 1)
                row.update(baseline_s=ref["seconds"], baseline_peak_gb=ref["peak_mem_gb"],
                           speedup=ref["seconds"] / mine["seconds"])
            else:
                row.update(baseline_s="n/a (OOM)", baseline_peak_gb="n/a", speedup="n/a")
            ours_gflops = _our_gemm_flops(n, q) / mine["seconds"] / 1e9
            mm = _matmul_gflops(n, q)
            row.update(gflops=ours_gflops, matmul_gflops=mm, pct_of_matmul=100 * ours_gflops / mm)
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
        impl, n, q, repeats = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(_one(impl, n, q, repeats)))
    else:
        main(quick="--quick" in sys.argv)
