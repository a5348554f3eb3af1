"""Case study 2: unsupervised representation learning by latent alignment.

Two augmented views of each image. The latents of view 1 (computed in the flow of the
view-1 anchors of the global batch) are run back through the flow of the view-2 anchors
and rewarded for landing in their own image's zone: -log max_k P(same image | x_k). No
decoder, no negatives. The linear probe reads the backbone features before the head.
"""
from __future__ import annotations

from torch import Tensor, nn

from lzn.distributed import global_indices
from lzn.objectives.base import AlignConfig, LatentConfig, ObjectiveModule, state_dtype
from lzn.zoning import alignment_loss, compute_latents


class RepresentationObjective(ObjectiveModule):
    def __init__(self, encoder: nn.Module, latent: LatentConfig, align: AlignConfig,
                 symmetric: bool = False, gather=None):
        super().__init__(gather)
        self.encoder = encoder
        self.latent, self.align, self.symmetric = latent, align, symmetric

    def _one_way(self, a_from: Tensor, a_to: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        c, al = self.latent, self.align
        z = compute_latents(a_from, noise, steps=c.steps, solver=c.solver, alpha=c.alpha,
                            eps=c.eps, gather=self.gather, state_dtype=state_dtype(c))
        targets = global_indices(a_from.shape[0], device=a_from.device)
        return alignment_loss(z, a_to, targets, steps=al.steps, solver=al.solver, eps=al.eps,
                              cutoff=al.cutoff, log=al.log, gather=self.gather, state_dtype=state_dtype(al))

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        v1, v2 = batch["views"]
        rng = batch["rng"]
        b = v1.shape[0]
        a1, a2 = self.encoder(v1), self.encoder(v2)
        loss, acc = self._one_way(a1, a2, rng.normal(b, self.latent.dim))
        if self.symmetric:
            back, acc2 = self._one_way(a2, a1, rng.normal(b, self.latent.dim))
            loss, acc = (loss + back) / 2, (acc + acc2) / 2
        return loss, {"loss/align": loss.detach(), "train/align_acc": acc}
