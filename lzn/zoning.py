"""The latent-zoning math: the closed-form flow between anchors and N(0, I).

Time convention: tau = 0 at the anchors, tau = 1 at the Gaussian, and
x_tau = (1 - tau) a + tau e. For anchors a_j (N, q) with weights w_j, a point x (q,)
at time tau has the posterior and velocity

    logit_j(x, tau) = log w_j - ||x - (1 - tau) a_j||^2 / (2 tau^2)
    P(j | x, tau)   = softmax_j logit_j
    v(x, tau)       = (x - sum_j P(j | x, tau) a_j) / tau              # dx/dtau

Expanding the square, logit_j = s x.a_j - s (1 - tau) ||a_j||^2 / 2 + log w_j + const(x)
with s = (1 - tau) / tau^2: one step is attention with queries x and keys/values a,
two GEMMs. `lzn.posterior.posterior_mean` is that attention as a fused, chunked autograd
function: it never builds the (B, N, q) difference tensor, keeps at most (B, chunk)
posteriors alive, and recomputes them in the backward pass instead of storing the
(B, N) posteriors of every solver step.

Public functions:
- `zone_posterior`: log P(j | x, tau), (B, N).
- `zone_velocity`: v(x, tau), (B, q).
- `compute_latents`: flow local anchors (+ eps * alpha * noise) from tau = eps to the Gaussian.
- `alignment_loss`: flow latents back through another flow, reward the target zone.
- `assign_zones`: index of the anchor each latent flows back to.

Precision: the math runs in the inputs' dtype (float32 or better) in IEEE arithmetic:
autocast is switched off, and so are TF32 and reduced-precision float32 matmuls
(`lzn.precision.ieee_float32`), during every call and inside the backward of its posterior GEMMs, so a
run that turns them on for its networks never reaches the logits, which are scaled by up
to 1/eps^2 (1e8 at eps = 1e-4) and need float32's 24-bit mantissa. Its backward is exact up to rounding: float64 matches central finite differences
at eps = 1e-4. In float32 most of the remaining gradient error comes from the solver's
(B, q) updates, which cancel to a few ulp of |a| near tau = eps, not from the GEMMs:
`state_dtype=torch.float64` keeps that state in float64 for O(B q) work per step
(`python -m benchmarks zoning-precision` measures both).

Every function takes an injected `gather` (identity by default) that turns this
process's anchors into the anchors of the global batch; `lzn.distributed` provides the
autograd-aware all-gather. Solvers ("euler", "dpm++2m", "dpm++3m", and "dpm++", the
paper's order 3) are in `lzn.solvers`, with the reference's grids.

Input checks: shapes, dtypes and Python arguments are always checked. The value checks
(NaN or inf in a tensor, targets inside [0, N), weights finite, non-negative and of positive
sum) read tensors on the host, a device sync on a GPU; they run while `check_values` is
on, the default for direct calls. The trainer turns them off for its steps, where a
non-finite input gives a non-finite loss that its skip policy handles.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from lzn import posterior
from lzn.errors import UserError
from lzn.precision import full_precision, ieee_backward
from lzn.solvers import SOLVERS, FlowGrid, solver_coefficients

Gather = Callable[[Tensor], Tensor]

DEFAULT_EPS = 1e-3


def _identity(t: Tensor) -> Tensor:
    return t


_CHECK_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("lzn_zoning_check_values", default=True)


@contextlib.contextmanager
def check_values(enabled: bool) -> Iterator[None]:
    """Turn the zoning functions' value checks (module docstring, "Input checks") on or off
    for the calls made inside the block, in this thread or task only."""
    if not isinstance(enabled, bool):
        raise UserError(f"check_values takes True or False, got {enabled!r}")
    token = _CHECK_VALUES.set(enabled)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)


def values_checked() -> bool:
    """Whether the value checks run here (`check_values`; on by default)."""
    return _CHECK_VALUES.get()


# --------------------------------------------------------------------------- validation
def _check_matrix(name: str, t: Tensor, q: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, q), got shape {tuple(t.shape)}")
    if q is not None and t.shape[1] != q:
        raise ValueError(
            f"{name} has latent dimension {t.shape[1]} but the anchors have {q}: "
            f"expected shape (*, {q}), got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if values_checked() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    return tau


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return eps


def _check_solver(solver: str, eps: float) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    if solver != "euler" and eps >= 0.5:
        raise ValueError(f"eps must be < 0.5 for {solver}, whose grid runs from eps to 1 - eps; got {eps}")
    return solver


def weights_to_log(weights: Tensor | None, n: int) -> Tensor | None:
    """Normalised log-weights (N,) from non-negative weights (N,), or None for uniform.

    Zero weights are allowed (that anchor's zone is empty); the sum must be positive
    (checked while `check_values` is on).
    """
    if weights is None:
        return None
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.shape[0] != n:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must have shape ({n},), one per anchor; got {shape}")
    weights = weights.detach()  # mixture weights are data (class frequencies), not parameters
    total = weights.sum()
    if not values_checked():
        return torch.log(weights) - torch.log(total)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got sum {float(total)}")
    return torch.log(weights) - torch.log(total)


def _check_log_weights(log_weights: Tensor | None, n: int) -> None:
    if log_weights is None:
        return
    if log_weights.dim() != 1 or log_weights.shape[0] != n:
        raise ValueError(
            f"log_weights must have shape ({n},), one per anchor; got {tuple(log_weights.shape)}"
        )
    if not values_checked():
        return
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError("log_weights must not contain NaN or +inf")
    if (log_weights == -math.inf).all():
        raise ValueError("log_weights are all -inf: the weights must sum to a positive number")


# ------------------------------------------------------------------------ public: fields
def _field_at(x: Tensor, anchors: Tensor, log_weights: Tensor | None, tau: float, chunk_size):
    """Validated inputs of the instantaneous field: the anchors' flow, x in its centred
    coordinates (B, q), and tau."""
    _check_matrix("anchors", anchors)
    _check_matrix("x", x, anchors.shape[1])
    _check_log_weights(log_weights, anchors.shape[0])
    tau = _check_tau(tau)
    flow = _Flow(anchors, log_weights, x.shape[0], chunk_size)
    return flow, x - (1.0 - tau) * flow.centre, tau


@full_precision
def zone_posterior(
    x: Tensor, anchors: Tensor, tau: float, log_weights: Tensor | None = None
) -> Tensor:
    """log P(j | x, tau): (B, N) for points x (B, q) and anchors (N, q).

    `log_weights` (N,) are log mixture weights (normalised or not: softmax ignores a
    shared constant). Materialises the (B, N) result by design; the solvers never do.
    """
    flow, y, tau = _field_at(x, anchors, log_weights, tau, None)
    scale, bias = posterior.logit_terms(flow.anchors, flow.sq_norms, log_weights, tau)
    logits = ieee_backward(torch.addmm(bias.unsqueeze(0), y, flow.anchors.t(), alpha=scale))
    return torch.log_softmax(logits, dim=1)


@full_precision
def zone_velocity(
    x: Tensor,
    anchors: Tensor,
    tau: float,
    log_weights: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """dx/dtau = (x - sum_j P(j | x, tau) a_j) / tau: (B, q) for x (B, q), anchors (N, q)."""
    flow, y, tau = _field_at(x, anchors, log_weights, tau, chunk_size)
    m, _, _ = flow.mean(y, tau)
    return (x - flow.centre - m) / tau


# ------------------------------------------------------------------------ the flow itself
class _Flow:
    """The flow of one anchor set, in coordinates centred on the anchors' mean.

    With y = x - (1 - tau) c, y follows the flow of the anchors a - c towards the same
    Gaussian, so the solver runs on centred anchors; y = x at tau = 1.
    """

    def __init__(self, anchors: Tensor, log_weights: Tensor | None, batch: int, chunk_size,
                 state_dtype: torch.dtype | None = None):
        self.centre = anchors.detach().mean(dim=0)
        self.anchors = anchors - self.centre
        self.sq_norms = (self.anchors * self.anchors).sum(dim=1)
        self.log_weights = log_weights
        self.chunk = posterior.chunk_size(batch, anchors.shape[0], chunk_size)
        self.state_dtype = state_dtype

    def centred(self, x: Tensor, tau: float) -> Tensor:
        """y = x - (1 - tau) c: x (B, q) at time tau in the centred coordinates."""
        return x if tau == 1.0 else x - (1.0 - tau) * self.centre.to(x.dtype)

    def uncentred(self, y: Tensor, tau: float) -> Tensor:
        return y if tau == 1.0 else y + (1.0 - tau) * self.centre.to(y.dtype)

    def mean(self, y: Tensor, tau: float, targets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        out = posterior.posterior_mean(y, self.anchors, self.sq_norms, self.log_weights, tau, self.chunk, targets)
        ieee_backward(out[0])  # one autograd node for the three outputs
        return out

    @torch.no_grad()
    def nearest(self, y: Tensor, tau: float) -> Tensor:
        """argmax_j P(j | y, tau): (B,) long, chunked over anchors."""
        y = y.to(self.anchors.dtype)
        scale, bias = posterior.logit_terms(self.anchors, self.sq_norms, self.log_weights, tau)
        best_logit = y.new_full((y.shape[0],), -math.inf)
        best = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
        for lo in range(0, self.anchors.shape[0], self.chunk):
            a = self.anchors[lo : lo + self.chunk]
            logits = torch.addmm(bias[lo : lo + self.chunk].unsqueeze(0), y, a.t(), alpha=scale)
            value, index = logits.max(dim=1)
            better = value > best_logit
            best = torch.where(better, index + lo, best)
            best_logit = torch.where(better, value, best_logit)
        return best

    def integrate(self, y: Tensor, grid: FlowGrid, observe=None, targets: Tensor | None = None) -> Tensor:
        """Run the multistep solver over `grid` from y (B, q); returns the end point in the
        state dtype (`state_dtype` of `_Flow`, else y's).

        `observe(k, y_k, log_p_k)` sees the point each step starts from, with
        log P(targets | y_k, tau_k) from the step's own posterior evaluation.
        """
        y = y.to(self.state_dtype or y.dtype)
        history: list[Tensor] = []
        for k, step in enumerate(grid.steps):
            m, _, log_p = self.mean(y.to(self.anchors.dtype), step.tau, targets)
            if observe is not None:
                observe(k, y, log_p)
            history.insert(0, m.to(y.dtype))
            del history[len(step.weights) :]
            y = step.x_coeff * y + sum(w * mk for w, mk in zip(step.weights, history))
        return y


def _state_dtype(state_dtype: torch.dtype | None) -> torch.dtype | None:
    if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
        raise ValueError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
    return state_dtype


@full_precision
def compute_latents(
    anchors: Tensor,
    noise: Tensor,
    *,
    steps: int,
    solver: str = "euler",
    alpha: float = 1.0,
    eps: float = DEFAULT_EPS,
    gather: Gather | None = None,
    weights: Tensor | None = None,
    chunk_size: int | None = None,
    flow_anchors: Tensor | None = None,
    state_dtype: torch.dtype | None = None,
) -> Tensor:
    """Latents (B, q) of this process's anchors (B, q) in the flow of all anchors.

    Starts at tau = eps from x = (1 - eps) a_i + eps * alpha * noise_i and integrates
    towards the Gaussian through the flow of `gather(anchors)` (N, q), weighted by
    `gather(weights)` (uniform when None): Euler ends at tau = 1, DPM-Solver++ at 1 - eps,
    as in the reference. alpha = 0 gives each zone's centre. Differentiable w.r.t. anchors.
    `flow_anchors` (N, q), with `weights` (N,), names the flow explicitly instead (e.g. a
    latent inside a label's zone: anchors = label_anchors[labels], flow_anchors = all labels).
    `state_dtype` (e.g. torch.float64) holds the solver's (B, q) state in that dtype while
    the posterior GEMMs stay in the anchors' dtype (module docstring, "Precision").
    Returns the latents in the anchors' dtype.
    """
    _check_matrix("anchors", anchors)
    _check_matrix("noise", noise, anchors.shape[1])
    if noise.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"noise must have one row per anchor: anchors {tuple(anchors.shape)}, noise {tuple(noise.shape)}"
        )
    steps, eps, solver = _check_steps(steps), _check_eps(eps), _check_solver(solver, eps)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if flow_anchors is not None:
        if gather is not None:
            raise ValueError("pass either gather or flow_anchors, not both")
        _check_matrix("flow_anchors", flow_anchors, anchors.shape[1])
        everyone, all_weights = flow_anchors, weights
    else:
        gather = gather or _identity
        everyone = gather(anchors)
        _check_matrix("gather(anchors)", everyone, anchors.shape[1])
        all_weights = gather(weights) if weights is not None else None
    log_w = weights_to_log(all_weights, everyone.shape[0])
    state = _state_dtype(state_dtype) or anchors.dtype
    flow = _Flow(everyone, log_w, anchors.shape[0], chunk_size, state)
    # Start in centred coordinates: y = (1 - eps)(a - c) + eps * alpha * e.
    y0 = (1.0 - eps) * (anchors.to(state) - flow.centre.to(state)) + (eps * alpha) * noise.to(state)
    grid = solver_coefficients(solver, steps, eps, forward=True)
    return flow.uncentred(flow.integrate(y0, grid), grid.taus[-1]).to(anchors.dtype)


@full_precision
def alignment_loss(
    latents: Tensor,
    anchors: Tensor,
    targets: Tensor,
    *,
    steps: int,
    cutoff: float = 0.2,
    log: bool = True,
    weights: Tensor | None = None,
    gather: Gather | None = None,
    solver: str = "euler",
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    state_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Latent alignment: -mean_b max_k [log] P(target_b | x_k, tau_k), and accuracy.

    latents: (B, q) are run back towards the anchors through the flow of `gather(anchors)`
    (N, q) in `steps` steps (Euler: tau = 1 -> 0; DPM-Solver++: 1 - eps -> eps); targets:
    (B,) indices into those N anchors. As in the reference, the posterior of the target is
    recorded at the point each step starts from (Euler: tau = 1, 1 - 1/n, ..., 1/n), the
    first int(cutoff * steps) records are dropped (near tau = 1 every zone looks alike)
    and the max is taken over the rest. Returns (loss, accuracy), accuracy being the share
    of latents whose posterior argmax at the last record is their target (detached).
    `state_dtype`: as in `compute_latents`.
    """
    _check_matrix("anchors", anchors)
    _check_matrix("latents", latents, anchors.shape[1])
    steps, eps, solver = _check_steps(steps), _check_eps(eps), _check_solver(solver, eps)
    if not 0.0 <= cutoff < 1.0:
        raise ValueError(f"cutoff must lie in [0, 1), got {cutoff}")
    gather = gather or _identity
    everyone = gather(anchors)
    _check_matrix("gather(anchors)", everyone, anchors.shape[1])
    n = everyone.shape[0]
    if targets.shape != (latents.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an integer tensor of shape ({latents.shape[0]},), "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if values_checked() and len(targets) and (targets.min() < 0 or targets.max() >= n):
        raise ValueError(f"targets must index the {n} anchors, got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    log_w = weights_to_log(gather(weights) if weights is not None else None, n)
    flow = _Flow(everyone, log_w, latents.shape[0], chunk_size, _state_dtype(state_dtype))
    grid = solver_coefficients(solver, steps, eps, forward=False)
    targets = targets.long()
    first_kept = int(cutoff * steps)
    best: Tensor | None = None
    last_hit: Tensor | None = None

    def record(k: int, y: Tensor, log_p: Tensor) -> None:
        nonlocal best, last_hit
        if k < first_kept:
            return
        value = log_p if log else log_p.exp()
        best = value if best is None else torch.maximum(best, value)
        if k == steps - 1:
            last_hit = (flow.nearest(y.detach(), grid.taus[k]) == targets).float().mean()

    flow.integrate(flow.centred(latents, grid.taus[0]), grid, observe=record, targets=targets)
    assert best is not None and last_hit is not None
    return -best.mean(), last_hit


@torch.no_grad()
@full_precision
def assign_zones(
    latents: Tensor,
    anchors: Tensor,
    *,
    steps: int,
    solver: str = "euler",
    eps: float = DEFAULT_EPS,
    weights: Tensor | None = None,
    gather: Gather | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Index (B,) of the anchor each latent (B, q) flows back to through `gather(anchors)`:
    the most likely anchor at the solver's last point (Euler's is tau = 0, the nearest
    anchor, as the reference's label assignment)."""
    _check_matrix("anchors", anchors)
    _check_matrix("latents", latents, anchors.shape[1])
    steps, eps, solver = _check_steps(steps), _check_eps(eps), _check_solver(solver, eps)
    everyone = (gather or _identity)(anchors)
    _check_matrix("gather(anchors)", everyone, anchors.shape[1])
    n = everyone.shape[0]
    log_w = weights_to_log((gather or _identity)(weights) if weights is not None else None, n)
    flow = _Flow(everyone, log_w, latents.shape[0], chunk_size)
    grid = solver_coefficients(solver, steps, eps, forward=False)
    y = flow.integrate(flow.centred(latents, grid.taus[0]), grid)
    # tau = 0 is the limit of tiny tau: the nearest anchor among those of positive weight.
    return flow.nearest(y, max(grid.taus[-1], eps))
