"""Gradient quality of the latent computation + alignment at the representation-learning
settings (Euler, 20 + 20 steps, eps = 1e-4, alpha = 0.45, cut-off 0.2, q = N = 256).

- float64: the directional derivative of autograd against central finite differences;
- float32: the relative error (in norm) of the anchor gradients against float64 for
  lzn.zoning, lzn.zoning with a float64 solver state (`state_dtype`), and the reference
  code's direct formula (the (B, N, q) differences, written in benchmarks.zoning).
"""
from __future__ import annotations

import json

import torch

from benchmarks.report import table
from benchmarks.zoning import OUT, _ref_mean

STEPS, EPS, ALPHA, CUTOFF = 20, 1e-4, 0.45, 0.2


def problem(norm: float, n: int = 256, q: int = 256, seed: int = 0):
    """View-1 anchors on a sphere of radius `norm`, view-2 anchors near them, noise, and a
    random direction for each view (all float64)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    a = torch.randn(n, q, **f64)
    a = a / a.norm(dim=1, keepdim=True) * norm
    b = a + 0.3 * norm / 16 * torch.randn(n, q, **f64)
    return a, b, torch.randn(n, q, **f64), torch.randn(n, q, **f64), torch.randn(n, q, **f64)


def ours(a, b, noise, state_dtype=None):
    from lzn.zoning import alignment_loss, compute_latents

    z = compute_latents(a, noise, steps=STEPS, solver="euler", alpha=ALPHA, eps=EPS, state_dtype=state_dtype)
    loss, _ = alignment_loss(z, b, torch.arange(a.shape[0]), steps=STEPS, eps=EPS, cutoff=CUTOFF,
                             state_dtype=state_dtype)
    return loss


def direct(a, b, noise):
    """The reference's loops: Euler eps -> 1, then 1 -> 0 with P recorded before each step."""
    x, t, dt = EPS * ALPHA * noise + (1 - EPS) * a, EPS, (1 - EPS) / STEPS
    for _ in range(STEPS):
        m, _ = _ref_mean(x, a, t)
        x, t = x + dt * (x - m) / t, t + dt
    rows, records, t = torch.arange(a.shape[0]), [], 1.0
    for _ in range(STEPS):
        m, p = _ref_mean(x, b, t)
        records.append(p[rows, rows])
        x, t = x - (x - m) / (t * STEPS), t - 1.0 / STEPS
    return -torch.log(torch.stack(records)[int(STEPS * CUTOFF):].max(dim=0).values).mean()


def _grads(fn, a, b, noise, **kw):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn(a, b, noise, **kw).backward()
    return torch.cat([a.grad.flatten(), b.grad.flatten()]).double()


def measure(norm: float) -> dict:
    a, b, noise, va, vb = problem(norm)
    h = 1e-4
    with torch.no_grad():
        fd = (ours(a + h * va, b + h * vb, noise) - ours(a - h * va, b - h * vb, noise)).item() / (2 * h)
    want = _grads(ours, a, b, noise)
    autograd = (want @ torch.cat([va.flatten(), vb.flatten()])).item()
    f32 = [t.float() for t in (a, b, noise)]
    rel = lambda g: ((g - want).norm() / want.norm()).item()
    row = {"anchor norm": norm, "FD (f64)": fd, "autograd (f64)": autograd,
           "f32 err": rel(_grads(ours, *f32))}
    row["f32 + f64 state err"] = rel(_grads(ours, *f32, state_dtype=torch.float64))
    row["direct f32 err"] = rel(_grads(direct, *f32))
    row["direct f64 vs ours f64"] = rel(_grads(direct, a, b, noise))
    return row


def main(quick: bool = False) -> None:
    rows = [measure(norm) for norm in ((16.0,) if quick else (16.0, 30.0))]
    print(f"\nZoning gradients at eps = {EPS}, Euler {STEPS} + {STEPS} steps, alpha = {ALPHA}, q = N = 256 "
          "(float32 errors: relative, in norm, against float64):")
    print(table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "zoning_precision.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
