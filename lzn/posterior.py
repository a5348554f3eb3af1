"""The fused, chunked posterior mean of the latent flow: the attention at the heart of
every zoning step (see `lzn.zoning` for the math and the time convention).

For points x (B, q) and anchors a (N, q), logit_j = scale * x.a_j + bias_j, and
`posterior_mean` returns E[a | x] = softmax(logits) a (B, q), the log-normaliser (B,) and
log P(target | x) (B,) as one autograd function. Forward is an online softmax over anchor
chunks; backward recomputes each chunk's posteriors. Memory is O(B x chunk): the (B, N, q)
difference tensor is never built and the (B, N) posteriors are never stored.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements of one (B, chunk) block of posteriors: 2^22 floats = 16 MiB in float32.
_BLOCK_ELEMENTS = 1 << 22


def chunk_size(batch: int, n: int, chunk_size: int | None) -> int:
    """Anchors per chunk: `chunk_size` if given, else as many as keep a (B, chunk) block
    of posteriors within 2^22 elements."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return min(chunk_size, n)
    return max(1, min(n, _BLOCK_ELEMENTS // max(batch, 1)))


class _PosteriorMean(torch.autograd.Function):
    """m = softmax(scale * x a^T + bias) a, its log-normaliser, and log P(target), chunked.

    x: (B, q), anchors: (N, q), bias: (N,), targets: (B,) long or None. Returns m (B, q),
    lse (B,) and log P(target_b | x_b) (B,) (empty without targets). Forward keeps an
    online softmax over anchor chunks; backward recomputes each chunk's posteriors.

    Precision: near the anchors the posterior is almost one-hot and `scale` is ~1/tau^2
    (1e8 at tau = 1e-4), so the logit gradient P_j (c_j - r), c_j = grad_m . a_j,
    r = grad_m . m, is a small difference of large numbers multiplied by a huge factor.
    r is therefore summed from the same products c_j (a one-hot row gives exactly 0), and
    the target term (delta_t - P) is formed before any GEMM.
    """

    @staticmethod
    def forward(ctx, x, anchors, bias, scale, chunk, targets):
        b, n = x.shape[0], anchors.shape[0]
        run_max = x.new_full((b,), -math.inf)
        run_sum = x.new_zeros(b)
        acc = x.new_zeros(x.shape)
        target_logit = x.new_zeros(b) if targets is not None else None
        for lo in range(0, n, chunk):
            a = anchors[lo : lo + chunk]
            p = torch.addmm(bias[lo : lo + chunk].unsqueeze(0), x, a.t(), alpha=scale)
            if targets is not None:
                rows, cols = _targets_in(targets, lo, p.shape[1])
                target_logit[rows] = p[rows, cols]
            new_max = torch.maximum(run_max, p.amax(dim=1))
            # Rows whose logits are all -inf so far keep a zero correction, not NaN.
            safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            correction = torch.exp(run_max - safe_max)
            p.sub_(safe_max.unsqueeze(1)).exp_()  # the (B, chunk) block is reused in place
            run_sum.mul_(correction).add_(p.sum(dim=1))
            acc.mul_(correction.unsqueeze(1)).addmm_(p, a)
            run_max = new_max
        m = acc.div_(run_sum.unsqueeze(1))
        lse = run_max.add_(torch.log(run_sum))
        log_p = target_logit - lse if targets is not None else x.new_empty(0)
        ctx.save_for_backward(x, anchors, bias, lse, targets if targets is not None else x.new_empty(0))
        ctx.scale, ctx.chunk, ctx.has_targets = scale, chunk, targets is not None
        ctx.set_materialize_grads(False)  # unused outputs pass None: skip their work
        return m, lse, log_p

    @staticmethod
    def backward(ctx, grad_m, grad_lse, grad_logp):
        x, anchors, bias, lse, targets = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        if not ctx.has_targets:
            grad_logp = None
        if grad_m is None and grad_lse is None and grad_logp is None:
            return None, None, None, None, None, None
        n = anchors.shape[0]
        neg_lse = (-lse).unsqueeze(1)
        bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]

        def posteriors(lo: int, hi: int) -> Tensor:  # P (B, hi - lo), recomputed
            return torch.addmm(bias[lo:hi].unsqueeze(0), x, anchors[lo:hi].t(), alpha=scale).add_(neg_lse).exp_()

        # d logit_j = P_j (c_j - r) + P_j p_coef + grad_logp (delta_jt - P_j), with c_j = grad_m . a_j
        # and r = grad_m . m = sum_k P_k c_k. r is summed from the very products c_j it is
        # subtracted from: a one-hot row then gives exactly 0 where r = grad_m . m, rounded
        # differently, left +-1 ulp that the ~1/tau^2 scale amplified (wrong-signed gradients
        # at tau = 1e-4). Several chunks take a first pass for r, keeping memory O(B x chunk).
        p_coef = torch.zeros_like(lse)
        if grad_lse is not None:
            p_coef = p_coef + grad_lse
        if grad_logp is not None:
            p_coef = p_coef - grad_logp
        p_coef = p_coef.unsqueeze(1)
        cached = None
        if grad_m is not None:
            r = torch.zeros_like(lse)
            for lo, hi in bounds:
                p, c = posteriors(lo, hi), grad_m @ anchors[lo:hi].t()
                r.add_((p * c).sum(dim=1))
                cached = (p, c) if len(bounds) == 1 else None
            r = r.unsqueeze(1)
        grad_x = torch.zeros_like(x)
        grad_a = torch.empty_like(anchors)
        grad_bias = torch.empty_like(bias)
        for lo, hi in bounds:
            a = anchors[lo:hi]
            if grad_m is not None:
                p, c = cached if cached is not None else (posteriors(lo, hi), grad_m @ a.t())
                g = p * c.sub_(r).add_(p_coef)  # c - r first: exactly 0 on a one-hot row
            else:
                p = posteriors(lo, hi)
                g = p * p_coef
            if grad_logp is not None:
                rows, cols = _targets_in(targets, lo, hi - lo)
                g[rows, cols] += grad_logp[rows]
            grad_bias[lo:hi] = g.sum(dim=0)
            grad_x.addmm_(g, a, alpha=scale)
            # dL/da_j = P^T grad_m (values) + scale * g^T x (keys).
            if grad_m is None:
                grad_a[lo:hi] = torch.mm(g.t(), x).mul_(scale)
            else:
                grad_a[lo:hi] = torch.addmm(p.t() @ grad_m, g.t(), x, alpha=scale)
        return grad_x, grad_a, grad_bias, None, None, None


def _targets_in(targets: Tensor, lo: int, width: int) -> tuple[Tensor, Tensor]:
    """Rows whose target lies in the anchor chunk [lo, lo + width), and its column there."""
    rows = ((targets >= lo) & (targets < lo + width)).nonzero().squeeze(1)
    return rows, targets[rows] - lo


def logit_terms(
    anchors: Tensor, sq_norms: Tensor, log_weights: Tensor | None, tau: float
) -> tuple[float, Tensor]:
    """Scale s and per-anchor bias (N,) so that logit_j = s x.a_j + bias_j + const(x)."""
    scale = (1.0 - tau) / (tau * tau)
    bias = sq_norms * (-0.5 * scale * (1.0 - tau))
    if log_weights is not None:
        bias = bias + log_weights
    return scale, bias


def posterior_mean(
    x: Tensor,
    anchors: Tensor,
    sq_norms: Tensor,
    log_weights: Tensor | None,
    tau: float,
    chunk: int,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """E[a | x, tau] (B, q), log-normaliser (B,) and log P(targets | x, tau) (B,) or empty."""
    scale, bias = logit_terms(anchors, sq_norms, log_weights, tau)
    return _PosteriorMean.apply(x, anchors, bias, scale, chunk, targets)
