"""Step coefficients for the latent flow: Euler and DPM-Solver++ multistep (orders 2, 3),
with the grids and updates of the paper's reference code (microsoft/latent-zoning-networks).

The latent flow x_tau = alpha_tau a + sigma_tau e has alpha = 1 - tau, sigma = tau and a
closed-form data prediction m(x, tau) = E[a | x, tau]. Every update below is linear in
x and in the last few m's, so a step is y' = x_coeff * y + sum_j w_j m_{k-j} with scalar
coefficients, computed here once per grid in float64.

- Euler is Euler in tau: y' = y + (tau' - tau) (y - m) / tau. The reference runs it from
  tau = eps to 1 (anchor -> latent) and from 1 to 0 (latent -> anchor) in equal steps;
  its last reverse step lands on m itself. `eps` is unused by the reverse Euler grid.
- DPM-Solver++ multistep (Lu et al. 2022) in the log-SNR lambda = log(alpha / sigma), with
  the reference's formulas (`lzn/latent_flow/dpm_solver_LZN.py`, its "dpmsolver" type):
  order 1 is DDIM, order 2 weights the first difference by -phi_1 / 2, order 3 uses the
  phi_2, phi_3 combination of two divided differences. The grid is uniform in time from
  tau = g to 1 - g (the reference's t_start = eps_end, t_end = 1 - eps_start), reversed for
  latent -> anchor. The first steps warm up one order at a time; with fewer than 10
  steps the last ones lower their order again (the reference's `lower_order_final`).

The paper uses "dpm++3m" for the latents of generation; "dpm++" names that solver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Registry: solver name -> multistep order (Euler is order 1, with its own grid).
SOLVERS: dict[str, int] = {"euler": 1, "dpm++2m": 2, "dpm++3m": 3, "dpm++": 3}
# The reference lowers the final orders only for short runs (`steps < 10` in its sampler).
_LOWER_ORDER_FINAL_BELOW = 10


@dataclass(frozen=True)
class Step:
    """One step from `tau` to the next point: y' = x_coeff * y + sum_j weights[j] * m_{k-j}."""

    tau: float
    x_coeff: float
    weights: tuple[float, ...]


@dataclass(frozen=True)
class FlowGrid:
    taus: tuple[float, ...]  # steps + 1 points, in the order they are visited
    steps: tuple[Step, ...]


def _linspace(start: float, end: float, steps: int) -> list[float]:
    taus = [start + (end - start) * k / steps for k in range(steps + 1)]
    taus[-1] = end
    return taus


def time_grid(solver: str, steps: int, eps: float, forward: bool) -> tuple[float, ...]:
    """The steps + 1 times `solver` visits between the anchors and the Gaussian."""
    if solver == "euler":
        return tuple(_linspace(eps, 1.0, steps) if forward else _linspace(1.0, 0.0, steps))
    return tuple(_linspace(eps, 1.0 - eps, steps) if forward else _linspace(1.0 - eps, eps, steps))


def _log_snr(tau: float) -> float:
    return math.log1p(-tau) - math.log(tau)


def _dpm_step(tau_s: float, tau_t: float, history: list[float], order: int) -> Step:
    """DPM-Solver++ multistep update of `order` from tau_s to tau_t.

    history: the times of the available data predictions, most recent (tau_s) first.
    """
    sigma_s, sigma_t, alpha_t = tau_s, tau_t, 1.0 - tau_t
    lam = [_log_snr(t) for t in history[:order]]
    h = _log_snr(tau_t) - lam[0]
    phi_1 = math.expm1(-h)
    first = -alpha_t * phi_1  # weight of m_0 in every order
    if order == 1:
        weights = (first,)
    elif order == 2:
        r0 = (lam[0] - lam[1]) / h
        d1_0 = (1.0 / r0, -1.0 / r0)  # D1_0 = (m_0 - m_1) / r0
        weights = (first - 0.5 * alpha_t * phi_1 * d1_0[0], -0.5 * alpha_t * phi_1 * d1_0[1])
    else:
        r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
        d1_0 = (1.0 / r0, -1.0 / r0, 0.0)
        d1_1 = (0.0, 1.0 / r1, -1.0 / r1)
        diff = [u - v for u, v in zip(d1_0, d1_1)]
        d1 = [u + r0 / (r0 + r1) * d for u, d in zip(d1_0, diff)]
        d2 = [d / (r0 + r1) for d in diff]
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        weights = tuple(
            (first if j == 0 else 0.0) + alpha_t * phi_2 * d1[j] - alpha_t * phi_3 * d2[j] for j in range(3)
        )
    return Step(tau_s, sigma_t / sigma_s, weights)


def solver_coefficients(solver: str, steps: int, eps: float, *, forward: bool) -> FlowGrid:
    """The grid and per-step coefficients of `solver` (see the module docstring).

    forward=True integrates anchor -> latent, False latent -> anchor.
    """
    order = SOLVERS[solver]
    taus = time_grid(solver, steps, eps, forward)
    if solver == "euler":
        # y' = (tau'/tau) y + (1 - tau'/tau) m: Euler in tau, also onto tau' = 0 or 1.
        ratios = [taus[k + 1] / taus[k] for k in range(steps)]
        return FlowGrid(taus, tuple(Step(taus[k], r, (1.0 - r,)) for k, r in enumerate(ratios)))
    out = []
    for k in range(steps):
        p = min(order, k + 1)  # warm-up: only k + 1 predictions exist
        if steps < _LOWER_ORDER_FINAL_BELOW:
            p = min(p, steps - k)
        out.append(_dpm_step(taus[k], taus[k + 1], list(taus[k::-1]), p))
    return FlowGrid(taus, tuple(out))
