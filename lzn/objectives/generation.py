"""Case study 1: Rectified Flow image generation, with (RF+LZN) or without (RF) a latent.

With LZN the decoder is conditioned on the training image's LZN latent: the encoder maps
each image to an anchor, `compute_latents` flows the anchors of the (global) batch to the
Gaussian, and the RF loss trains encoder and decoder end to end through that flow. At
sampling time the latent is drawn from N(0, I), which is where latents live by design.
"""
from __future__ import annotations

from torch import Tensor, nn

from lzn.objectives.base import LatentConfig, ObjectiveModule, rectified_flow_loss, rf_times, state_dtype
from lzn.zoning import compute_latents


class GenerationObjective(ObjectiveModule):
    def __init__(self, encoder: nn.Module | None, decoder: nn.Module, latent: LatentConfig, gather=None):
        super().__init__(gather)
        if encoder is not None:
            self.encoder = encoder
        self.decoder = decoder
        self.latent = latent

    @property
    def uses_lzn(self) -> bool:
        return hasattr(self, "encoder")

    def latents(self, images: Tensor, noise: Tensor) -> Tensor:
        """LZN latents (B, q) of images (B, C, H, W) within their (gathered) batch."""
        c = self.latent
        return compute_latents(self.encoder(images), noise, steps=c.steps, solver=c.solver,
                               alpha=c.alpha, eps=c.eps, gather=self.gather, state_dtype=state_dtype(c))

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images, rng = batch["images"], batch["rng"]
        b = images.shape[0]
        cond = self.latents(images, rng.normal(b, self.latent.dim)) if self.uses_lzn else None
        loss = rectified_flow_loss(self.decoder, images, cond, rf_times(rng, b),
                                   rng.normal(b, *images.shape[1:]))
        return loss, {"loss/rf": loss.detach()}
