"""The image ODE of Rectified Flow: sampling (noise -> image) and inversion (image -> noise).

x_t = t x + (1 - t) noise, t = 1 at the data; the decoder predicts dx/dt. Euler with a
fixed number of steps, or RK45 through scipy's solve_ivp with rtol = atol = 1e-5 as in the
paper's protocol (the Rectified Flow code does the same, on the flattened batch).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lzn.objectives.base import RF_EPS

METHODS = ("euler", "rk45")


def _velocity(decoder: nn.Module, x: Tensor, t: float, cond: Tensor | None) -> Tensor:
    return decoder(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), cond)


@torch.no_grad()
def integrate(decoder: nn.Module, x: Tensor, cond: Tensor | None, t0: float, t1: float, *,
              method: str = "euler", steps: int = 10, rtol: float = 1e-5, atol: float = 1e-5
              ) -> tuple[Tensor, int]:
    """Integrate dx/dt = decoder(x, t, cond) from t0 to t1; returns (x(t1), evaluations)."""
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {METHODS}")
    if method == "euler":
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        ts = torch.linspace(t0, t1, steps + 1).tolist()
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * _velocity(decoder, x, a, cond)
        return x, steps
    from scipy.integrate import solve_ivp

    shape, dtype, device = x.shape, x.dtype, x.device

    def rhs(t, y):
        xt = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        return _velocity(decoder, xt, float(t), cond).double().cpu().numpy().reshape(-1)

    sol = solve_ivp(rhs, (t0, t1), x.double().cpu().numpy().reshape(-1), rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"RK45 failed to integrate the image ODE: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).to(device=device, dtype=dtype).reshape(shape), int(sol.nfev)


def sample(decoder: nn.Module, noise: Tensor, cond: Tensor | None = None, **kw) -> Tensor:
    """Images (B, C, H, W) from noise (B, C, H, W): integrate from t = RF_EPS to 1."""
    return integrate(decoder, noise, cond, RF_EPS, 1.0, **kw)[0]


def invert(decoder: nn.Module, images: Tensor, cond: Tensor | None = None, **kw) -> Tensor:
    """The noise (B, C, H, W) that the ODE maps to `images`: integrate from t = 1 back to RF_EPS."""
    return integrate(decoder, images, cond, 1.0, RF_EPS, **kw)[0]


def seeded_normal(seed: int, *shape: int, device=None) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)
