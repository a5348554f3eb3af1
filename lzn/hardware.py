"""How the networks run on their device: TF32 matmuls, `channels_last`, `cudnn.benchmark`
and `torch.compile` (`HardwareConfig`, the `hardware:` section), applied to an objective by
`apply_hardware` right after it is built.

None of these changes what is trained, only how fast: a resumed run may switch them
(Role.RUNTIME), and a checkpoint written with any of them loads without them and back
(`channels_last` is a memory layout, `compile` wraps a module's call, not its parameters).
bf16 autocast is `train.bf16` (lzn.trainer), which changes the arithmetic and is a training
setting. Whatever the networks use, `lzn.zoning` runs in IEEE float32 or better: it switches
autocast off inside, and TF32 with it (its logits are scaled by up to 1/eps^2 = 1e8, where
TF32's 10-bit mantissa leaves no correct digit).

The TF32 and cuDNN switches are process-wide and apply on CUDA only; elsewhere they are
ignored. They are set through the legacy `allow_tf32` flags, which every reader in torch
(inductor included) and `torch.set_float32_matmul_precision` understand; mixing them with
the `fp32_precision` API makes torch refuse to read the state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lzn.roles import Role, role_field

# The module groups whose forward `compile` wraps: the networks, never the label anchors
# (a parameter table) nor the zoning math (Python control flow over solver steps).
COMPILED_GROUPS = ("encoder", "decoder")


@dataclass
class HardwareConfig:
    """The `hardware:` section (pipelines/conf/hardware/{cpu,gpu}.yaml). Off everywhere by
    default: PyTorch's own defaults, what a run did before these settings existed."""
    # CUDA: float32 matmuls and convolutions of the networks in TF32 (10-bit mantissa,
    # float32 range). False leaves PyTorch's defaults (IEEE matmuls; cuDNN may use TF32 in
    # convolutions, its default).
    tf32: bool = role_field(Role.RUNTIME, default=False)
    # Parameters (and so the convolutions' outputs) in NHWC layout: the layout tensor cores read.
    channels_last: bool = role_field(Role.RUNTIME, default=False)
    # CUDA: cuDNN times the algorithms of each new input shape once and keeps the fastest.
    # A training run's shapes are fixed, so the search is paid once.
    cudnn_benchmark: bool = role_field(Role.RUNTIME, default=False)
    # torch.compile of the encoder and decoder (`COMPILED_GROUPS`): minutes of compilation
    # at the start, then fused kernels. Off unless asked for (hardware.compile=true).
    compile: bool = role_field(Role.RUNTIME, default=False)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions of this process (CUDA only)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_module(module: nn.Module, backend: str | Callable = "inductor", **options: Any) -> nn.Module:
    """Compile `module`'s forward in place (`nn.Module.compile`): it stays the same object,
    with the same parameters and state_dict keys, so the optimizer, the trainer's module
    groups and every checkpoint see no difference. A deep copy (the trainer's EMA) or a
    pickled copy (a registered model) is the plain module: torch drops the compiled call."""
    module.compile(backend=backend, **options)
    return module


def apply_hardware(objective: nn.Module, cfg: HardwareConfig, device: torch.device | str,
                   compile_backend: str | Callable = "inductor") -> nn.Module:
    """Apply `cfg` to `objective` (already on `device`) and return it, changed in place.
    compile_backend: torch.compile's backend (tests pass a recording one)."""
    device = torch.device(device)
    if device.type == "cuda":  # process-wide switches that exist for CUDA alone
        if cfg.tf32:
            set_tf32(True)
        if cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
    if cfg.channels_last:
        objective.to(memory_format=torch.channels_last)  # 4-D parameters only; the rest is unchanged
    if cfg.compile:
        for name in COMPILED_GROUPS:
            module = getattr(objective, name, None)
            if isinstance(module, nn.Module):
                compile_module(module, compile_backend)
    return objective
