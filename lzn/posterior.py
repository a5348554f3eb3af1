"""The fused, blocked posterior mean of the latent flow: the attention at the heart of
every zoning step (see `lzn.zoning` for the math and the time convention).

For points x (B, q) and anchors a (N, q), logit_j = scale * x.a_j + bias_j, and
`posterior_mean` returns E[a | x] = softmax(logits) a (B, q), the log-normaliser (B,) and
log P(target | x) (B,) as one autograd function. It runs over blocks of whole rows: a
block's logits (rows, N) are one GEMM, its softmax is exact (no online rescaling) and the
backward recomputes the same block's posteriors with the same GEMM, so they match the
forward's bit for bit. Memory is O(B x chunk): the (B, N, q) difference tensor is never
built and the (B, N) posteriors are never stored.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements of one (B, chunk) block of posteriors: 2^22 floats = 16 MiB in float32.
_BLOCK_ELEMENTS = 1 << 22
# On a CPU a block also stays within 2^20 elements (4 MiB in float32): the backward's three
# blocks then stay in the last-level cache between the GEMM that writes them and the passes
# that read them (B = N = 4096: 256 rows, the fastest of 2^17..2^22 here). A GPU takes the
# whole budget: its kernels want large blocks.
_CPU_BLOCK_ELEMENTS = 1 << 20
# The kernel works with base-2 logits, log2(e) * logit, scaled by the GEMM's alpha: torch's
# exp2 runs ~5x faster than its exp on this CPU (the exp was a third of q = 64's time), and
# exp2(0) = 1 keeps a one-hot row exact.
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def chunk_size(batch: int, n: int, chunk_size: int | None) -> int:
    """Anchors per chunk: `chunk_size` if given, else as many as keep a (B, chunk) block
    of posteriors within 2^22 elements."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return min(chunk_size, n)
    return max(1, min(n, _BLOCK_ELEMENTS // max(batch, 1)))


def rows_per_block(batch: int, n: int, chunk: int, device: torch.device) -> int:
    """Rows of the (rows, N) blocks that hold at most batch x chunk posteriors (at least
    one row), and on a CPU at most `_CPU_BLOCK_ELEMENTS`."""
    budget = batch * chunk
    if device.type == "cpu":
        budget = min(budget, _CPU_BLOCK_ELEMENTS)
    return max(1, min(batch, budget // max(n, 1)))


def _blocks(b: int, n: int, rows: int, buffers: Tensor):
    """(lo, hi, views): the row blocks [lo, hi) and a (hi - lo, N) view of each buffer."""
    for lo in range(0, b, rows):
        hi = min(lo + rows, b)
        yield lo, hi, [buf[: (hi - lo) * n].view(hi - lo, n) for buf in buffers]


def _base2_logits(x: Tensor, keys: Tensor, bias2: Tensor, scale: float, out: Tensor) -> Tensor:
    """log2(e) * (scale x keys + bias) (rows, N) into `out`: forward and backward call this
    with the same operands, so their logits agree bit for bit."""
    return torch.addmm(bias2, x, keys, alpha=scale * _LOG2E, out=out)


class _PosteriorMean(torch.autograd.Function):
    """m = softmax(scale * x a^T + bias) a, its log-normaliser, and log P(target), blocked.

    x: (B, q), anchors: (N, q), bias: (N,), targets: (B,) long or None; rows: rows per
    block. Returns m (B, q), lse (B,) and log P(target_b | x_b) (B,) (empty without
    targets). GEMMs per block: 2 forward (logits, P a), up to 5 backward (logits again,
    c = grad_m a^T, grad_x, and the values' and keys' parts of grad_a).

    Precision: near the anchors the posterior is almost one-hot and `scale` is ~1/tau^2
    (1e8 at tau = 1e-4), so the logit gradient P_j (c_j - r), c_j = grad_m . a_j,
    r = grad_m . m, is a small difference of large numbers multiplied by a huge factor.
    r is therefore summed from the same products c_j (a one-hot row gives exactly 0: the
    backward's logits equal the forward's bit for bit, so P_t = exp2(0) = 1), and the
    target term (delta_t - P) is formed before any GEMM.
    """

    @staticmethod
    def forward(ctx, x, anchors, bias, scale, rows, targets):
        b, n = x.shape[0], anchors.shape[0]
        m, lse2 = torch.empty_like(x), x.new_empty(b)  # lse2: the base-2 log-normaliser
        log_p = x.new_empty(b if targets is not None else 0)
        block = x.new_empty(1, min(rows, b) * n)  # one (rows, N) buffer for every block
        keys, bias2 = anchors.t(), (bias * _LOG2E).unsqueeze(0)
        if targets is not None:
            column, valid = _target_columns(targets, n)
        for lo, hi, (p,) in _blocks(b, n, rows, block):
            _base2_logits(x[lo:hi], keys, bias2, scale, out=p)
            if targets is not None:
                torch.gather(p, 1, column[lo:hi], out=log_p[lo:hi].unsqueeze(1))
            top = p.amax(dim=1)
            total = p.sub_(top.unsqueeze(1)).exp2_().sum(dim=1)
            torch.mm(p, anchors, out=m[lo:hi]).div_(total.unsqueeze(1))
            torch.add(top, total.log2_(), out=lse2[lo:hi])
        if targets is not None:
            log_p = log_p.masked_fill_(~valid, 0.0).sub_(lse2).mul_(_LN2)
        ctx.save_for_backward(x, anchors, bias, lse2, targets if targets is not None else x.new_empty(0))
        ctx.scale, ctx.rows, ctx.has_targets = scale, rows, targets is not None
        ctx.set_materialize_grads(False)  # unused outputs pass None: skip their work
        return m, lse2 * _LN2, log_p

    @staticmethod
    def backward(ctx, grad_m, grad_lse, grad_logp):
        x, anchors, bias, lse2, targets = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        if not ctx.has_targets:
            grad_logp = None
        if grad_m is None and grad_lse is None and grad_logp is None:
            return None, None, None, None, None, None
        need_x, need_a, need_bias = ctx.needs_input_grad[:3]
        b, n = x.shape[0], anchors.shape[0]
        # d logit_j = P_j (c_j - r) + P_j p_coef + grad_logp (delta_jt - P_j), with c_j = grad_m . a_j
        # and r = grad_m . m = sum_k P_k c_k. r is summed from the very products c_j it is
        # subtracted from: a one-hot row then gives exactly 0 where r = grad_m . m, rounded
        # differently, left +-1 ulp that the ~1/tau^2 scale amplified (wrong-signed gradients
        # at tau = 1e-4). A block holds whole rows, so r needs no second pass.
        p_coef = grad_lse
        if grad_logp is not None:
            p_coef = -grad_logp if p_coef is None else p_coef - grad_logp
            column, valid = _target_columns(targets, n)
            delta = grad_logp.masked_fill(~valid, 0.0).unsqueeze(1)  # the delta_jt term
        grad_x = torch.empty_like(x) if need_x else None
        grad_a = (torch.empty_like(anchors) if b else torch.zeros_like(anchors)) if need_a else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        # P, g (first c) and P * c: one buffer each, reused by every block.
        buffers = x.new_empty(3 if grad_m is not None else 1, min(rows, b) * n)
        keys, bias2 = anchors.t(), (bias * _LOG2E).unsqueeze(0)
        for lo, hi, views in _blocks(b, n, rows, buffers):
            p = _base2_logits(x[lo:hi], keys, bias2, scale, out=views[0])
            p.sub_(lse2[lo:hi].unsqueeze(1)).exp2_()
            if grad_m is not None:
                g = torch.mm(grad_m[lo:hi], keys, out=views[1])  # c
                r = torch.mul(p, g, out=views[2]).sum(dim=1, keepdim=True)
                g.sub_(r)  # c - r first: exactly 0 on a one-hot row
                if p_coef is not None:
                    g.add_(p_coef[lo:hi].unsqueeze(1))
                g.mul_(p)
            else:
                g = p.mul_(p_coef[lo:hi].unsqueeze(1))
            if grad_logp is not None:
                g.scatter_add_(1, column[lo:hi], delta[lo:hi])
            if need_bias:
                grad_bias.add_(g.sum(dim=0))
            if need_x:
                grad_x[lo:hi].addmm_(g, anchors, beta=0, alpha=scale)
            if need_a:
                # dL/da_j = P^T grad_m (values) + scale * g^T x (keys), summed over the blocks.
                beta = 0 if lo == 0 else 1
                if grad_m is not None:
                    grad_a.addmm_(p.t(), grad_m[lo:hi], beta=beta)
                    beta = 1
                grad_a.addmm_(g.t(), x[lo:hi], beta=beta, alpha=scale)
        return grad_x, grad_a, grad_bias, None, None, None


def _target_columns(targets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Each row's target as a gather index (B, 1), and whether it names one of the n anchors
    (B,): unchecked targets (`lzn.zoning.check_values(False)`) outside [0, n) get no
    target term, log P = -lse, instead of an out-of-bounds index."""
    valid = (targets >= 0) & (targets < n)
    return torch.where(valid, targets, 0).unsqueeze(1), valid


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
    """E[a | x, tau] (B, q), log-normaliser (B,) and log P(targets | x, tau) (B,) or empty.

    chunk: anchors per chunk (`chunk_size`); the blocks of whole rows hold at most
    B x chunk posteriors (`rows_per_block`).
    """
    scale, bias = logit_terms(anchors, sq_norms, log_weights, tau)
    rows = rows_per_block(x.shape[0], anchors.shape[0], chunk, x.device)
    return _PosteriorMean.apply(x, anchors, bias, scale, rows, targets)
