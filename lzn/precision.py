"""IEEE float32 inside the zoning math, whatever the networks around it use.

The zoning logits are scaled by up to 1 / eps^2 (1e8 at eps = 1e-4) and cancel to the few
units that decide the softmax: TF32's 10-bit mantissa, bf16 or fp16 would lose them. Every
public `lzn.zoning` function runs under `full_precision`: autocast off, half-precision inputs
upcast, TF32 and reduced-precision float32 matmuls off (`ieee_float32`), the caller's
settings restored after, its backward too (`ieee_backward`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor

_B = torch.backends
# torch >= 2.9 also has per-backend fp32_precision settings; reading the older flags raises
# once a caller has mixed the two APIs, so the state is saved through the API that answers.
_PRECISION_LEAVES = tuple(
    leaf for leaf in (getattr(getattr(_B, b, None), op, None) for b in ("cuda", "cudnn", "mkldnn")
                      for op in ("matmul", "conv", "rnn"))
    if leaf is not None and hasattr(leaf, "fp32_precision")
)


def _enter_ieee_float32() -> tuple:
    """Switch TF32 and reduced-precision float32 matmuls off; returns what restores them."""
    try:
        saved = ("legacy", _B.cuda.matmul.allow_tf32, _B.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:  # the newer API set them: save and set through it
        saved = ("leaves", [(leaf, leaf.fp32_precision) for leaf in _PRECISION_LEAVES])
        for leaf in _PRECISION_LEAVES:
            leaf.fp32_precision = "ieee"
        return saved
    torch.set_float32_matmul_precision("highest")
    _B.cuda.matmul.allow_tf32 = False
    _B.cudnn.allow_tf32 = False
    return saved


def _restore_precision(saved: tuple) -> None:
    if saved[0] == "legacy":
        _, matmul, cudnn, precision = saved
        torch.set_float32_matmul_precision(precision)  # first: it also sets the matmul TF32 flag
        _B.cuda.matmul.allow_tf32, _B.cudnn.allow_tf32 = matmul, cudnn
    else:
        for leaf, value in saved[1]:
            leaf.fp32_precision = value


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 matmuls and convolutions inside the block (no TF32, no bf16 passes), the
    caller's settings restored after it, also when it raises. The settings are process-wide."""
    saved = _enter_ieee_float32()
    try:
        yield
    finally:
        _restore_precision(saved)


def ieee_backward(t: Tensor) -> Tensor:
    """Run the backward of t's autograd node (the posterior GEMMs) under `ieee_float32` too:
    it runs later, in loss.backward(), outside the call that built it."""
    node = t.grad_fn
    if node is not None:
        saved: list[tuple] = []
        node.register_prehook(lambda grad_outputs: saved.append(_enter_ieee_float32()))
        node.register_hook(lambda grad_inputs, grad_outputs: _restore_precision(saved.pop()))
    return t


def full_precision(fn):
    """Run the zoning math in IEEE float32 or better, also inside a bf16/fp16 autocast region
    and with TF32 on: the expanded logits and the solver's cancellations need float32's
    mantissa."""

    def up(v):
        return v.float() if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False), ieee_float32():
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper
