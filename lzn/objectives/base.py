"""What every objective shares: the latent-flow settings and the Rectified Flow loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LatentConfig:
    """How anchors become latents (compute_latents)."""

    dim: int = 200
    steps: int = 20
    solver: str = "dpm++"
    eps: float = 1e-3
    alpha: float = 1.0
    # Hold the solver's (B, q) state in float64 while the GEMMs stay float32: about 3% more
    # time, 7-9x less float32 gradient error at eps = 1e-4 (`python -m benchmarks zoning-precision`).
    float64_state: bool = False


@dataclass
class AlignConfig:
    """Latent alignment (alignment_loss)."""

    steps: int = 20
    solver: str = "euler"
    eps: float = 1e-3
    cutoff: float = 0.2
    log: bool = True  # -log max P (representation); False gives -max P (joint)
    weight: float = 1.0
    float64_state: bool = False  # as LatentConfig.float64_state, for the reverse flow
    # g of a latent drawn inside a label's zone of this flow (class-conditional generation):
    # the reference's label flow (EulerLatentFlow) starts there at its default 1e-4,
    # whatever eps the alignment uses.
    zone_eps: float = 1e-4


RF_EPS = 1e-3  # image-flow times are drawn from [RF_EPS, 1], as in the Rectified Flow code


def state_dtype(cfg: LatentConfig | AlignConfig) -> torch.dtype | None:
    """The zoning `state_dtype` a latent or alignment config asks for."""
    return torch.float64 if cfg.float64_state else None


def rectified_flow_loss(decoder: nn.Module, images: Tensor, cond: Tensor | None, t: Tensor,
                        noise: Tensor) -> Tensor:
    """Mean squared error of the decoder's velocity at x_t = t x + (1 - t) noise.

    images, noise: (B, C, H, W); t: (B,) in [RF_EPS, 1] (t = 1 is data); cond: (B, d) or None.
    The target velocity of the straight path is x - noise.
    """
    tt = t.view(-1, *([1] * (images.dim() - 1)))
    x_t = tt * images + (1.0 - tt) * noise
    return ((decoder(x_t, t, cond) - (images - noise)) ** 2).mean()


def rf_times(rng, batch: int) -> Tensor:
    return rng.uniform(batch) * (1.0 - RF_EPS) + RF_EPS


def no_gather(t: Tensor) -> Tensor:
    return t


class ObjectiveModule(nn.Module):
    """Base: children are parameter groups; `gather` is the injected anchor all-gather."""

    def __init__(self, gather=None):
        super().__init__()
        self.gather = gather or no_gather

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError
