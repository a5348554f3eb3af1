"""Step coefficients for the latent flow: Euler and DPM-Solver++ multistep (orders 2, 3).

The latent flow x_tau = alpha_tau a + sigma_tau e has alpha = 1 - tau, sigma = tau and a
closed-form data prediction m(x, tau) = E[a | x, tau]. In the log-SNR variable
lambda = log(alpha / sigma) its exact solution is (Lu et al., DPM-Solver++, eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda m(lambda) dlambda.

DPM-Solver++ multistep replaces m by the polynomial through the last `order` values
m_k, m_{k-1}, ... (in lambda) and integrates e^lambda times that polynomial exactly.
Because m enters linearly, each step is x_{k+1} = c_k x_k + sum_j w_kj m_{k-j} with
scalar coefficients, computed here once per grid in float64.

Two things are specific to this flow and handled exactly rather than approximated:
- tau = 1 is lambda = -inf. A forward (anchor -> latent) last step integrates up to it:
  e^lambda kills the polynomial's growth, and the integrals have finite limits.
- A reverse (latent -> anchor) run starts at lambda = -inf, where m is the prior mean
  whatever x is: that node carries no slope information and is dropped from the
  interpolation, so the reverse run warms up one order later.
Order 1 of this scheme is DDIM, which for sigma = tau coincides with Euler in tau.

Steps are uniform in time (tau), as in the DPM-Solver code's "time_uniform" schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Registry: solver name -> multistep order (Euler is order 1 of the same scheme).
SOLVERS: dict[str, int] = {"euler": 1, "dpm++2m": 2, "dpm++3m": 3, "dpm++": 2}


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


def _log_snr(tau: float) -> float:
    if tau >= 1.0:
        return -math.inf
    return math.log1p(-tau) - math.log(tau)


def _exp_moments(h: float, k_max: int) -> list[float]:
    """J_k(h) = int_0^h e^v v^k dv for k = 0..k_max; h may be -inf."""
    if h == -math.inf:
        return [(-1.0) ** (k + 1) * math.factorial(k) for k in range(k_max + 1)]
    if abs(h) < 0.5:
        # Series: no cancellation for small steps.
        out = []
        for k in range(k_max + 1):
            total, n, term = 0.0, 0, 1.0
            while True:
                contrib = term * h ** (n + k + 1) / (n + k + 1)
                total += contrib
                if abs(contrib) <= 1e-18 * max(abs(total), 1e-300) or n > 60:
                    break
                n += 1
                term /= n
            out.append(total)
        return out
    # Recurrence J_k = h^k e^h - k J_{k-1}.
    eh = math.exp(h)
    out = [math.expm1(h)]
    for k in range(1, k_max + 1):
        out.append(h**k * eh - k * out[-1])
    return out


def _lagrange_power_coeffs(nodes: list[float]) -> list[list[float]]:
    """For each node j, the power-basis coefficients of its Lagrange polynomial."""
    coeffs = []
    for j, vj in enumerate(nodes):
        poly = [1.0]
        for i, vi in enumerate(nodes):
            if i == j:
                continue
            denom = vj - vi
            # poly *= (v - vi) / denom
            nxt = [0.0] * (len(poly) + 1)
            for d, c in enumerate(poly):
                nxt[d + 1] += c / denom
                nxt[d] -= c * vi / denom
            poly = nxt
        coeffs.append(poly)
    return coeffs


def _step(tau_s: float, tau_t: float, lambdas_hist: list[float]) -> Step:
    """Coefficients of one exponential-integrator step with the given history nodes.

    lambdas_hist[0] is lambda(tau_s); later entries are earlier points (finite only).
    """
    sigma_s, sigma_t = tau_s, tau_t
    alpha_s, alpha_t = 1.0 - tau_s, 1.0 - tau_t
    x_coeff = sigma_t / sigma_s
    if alpha_s == 0.0:  # starting at the Gaussian end: m is constant, first order is exact
        return Step(tau_s, x_coeff, (alpha_t,))
    lam_s = lambdas_hist[0]
    h = _log_snr(tau_t) - lam_s
    nodes = [lam - lam_s for lam in lambdas_hist]
    moments = _exp_moments(h, len(nodes) - 1)
    c = sigma_t * alpha_s / sigma_s  # sigma_t * e^{lambda_s}
    weights = tuple(
        c * sum(ck * jk for ck, jk in zip(poly, moments)) for poly in _lagrange_power_coeffs(nodes)
    )
    return Step(tau_s, x_coeff, weights)


def time_grid(steps: int, eps: float, forward: bool) -> tuple[float, ...]:
    """steps + 1 uniform points between eps and 1, increasing if forward else decreasing."""
    taus = [eps + (1.0 - eps) * k / steps for k in range(steps + 1)]
    taus[-1] = 1.0
    return tuple(taus if forward else taus[::-1])


def solver_coefficients(
    solver: str, steps: int, eps: float, *, forward: bool, lower_order_final: bool = True
) -> FlowGrid:
    """The grid and per-step coefficients of `solver` between eps and 1.

    forward=True integrates anchor -> latent (tau: eps -> 1), False latent -> anchor.
    With lower_order_final (DPM-Solver's default for short runs), the last steps use at
    most as many history points as steps remain, which keeps few-step runs stable.
    """
    order = SOLVERS[solver]
    taus = time_grid(steps, eps, forward)
    lambdas = [_log_snr(t) for t in taus]
    out = []
    for k in range(steps):
        p = order
        if lower_order_final and steps < 15:
            p = min(p, steps - k)
        hist = [lam for lam in lambdas[max(0, k - p + 1) : k + 1][::-1] if math.isfinite(lam)]
        if not hist:  # the reverse run's first step
            hist = [lambdas[k]]
        out.append(_step(taus[k], taus[k + 1], hist))
    return FlowGrid(taus, tuple(out))
