"""Case study 3: joint class-conditional generation and classification.

Case study 1 plus learnable label anchors, one per class. The decoder is conditioned on
[image latent, one-hot label]; the image latents are aligned to their label's zone in the
label flow, whose weights are the class frequencies of the global batch in training
(uniform at test). -max P, cut-off 0.2, Euler 100 steps in the paper. The decoder is
frozen after its iteration budget by the trainer (`train.freeze_after`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lzn import distributed as lzn_dist
from lzn.objectives.base import AlignConfig, LatentConfig, ObjectiveModule, rectified_flow_loss, rf_times, state_dtype
from lzn.zoning import alignment_loss, compute_latents


def global_class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Class frequencies (num_classes,) of the global batch (summed over ranks).

    A comparison table rather than torch.bincount, which reads the largest label on the
    host (a device sync on a GPU) to size its output."""
    classes = torch.arange(num_classes, device=labels.device)
    counts = (labels.unsqueeze(1) == classes).sum(dim=0).to(torch.float32)
    if lzn_dist.is_distributed():
        dist.all_reduce(counts)
    return counts


class JointObjective(ObjectiveModule):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, labels: nn.Module,
                 latent: LatentConfig, align: AlignConfig, gather=None):
        super().__init__(gather)
        self.encoder, self.decoder, self.labels = encoder, decoder, labels
        self.latent, self.align = latent, align

    @property
    def num_classes(self) -> int:
        return self.labels().shape[0]  # labels(): (num_classes, q) label anchors

    def condition(self, z: Tensor, labels: Tensor) -> Tensor:
        """Decoder conditioning (B, q + C): the latent and the one-hot label."""
        return torch.cat([z, nn.functional.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels, rng = batch["images"], batch["labels"], batch["rng"]
        b, c, al = images.shape[0], self.latent, self.align
        z = compute_latents(self.encoder(images), rng.normal(b, c.dim), steps=c.steps,
                            solver=c.solver, alpha=c.alpha, eps=c.eps, gather=self.gather,
                            state_dtype=state_dtype(c))
        rf = rectified_flow_loss(self.decoder, images, self.condition(z, labels), rf_times(rng, b),
                                 rng.normal(b, *images.shape[1:]))
        align, acc = alignment_loss(
            z, self.labels(), labels, steps=al.steps, solver=al.solver, eps=al.eps,
            cutoff=al.cutoff, log=al.log, weights=global_class_counts(labels, self.num_classes),
            state_dtype=state_dtype(al),
        )
        loss = rf + al.weight * align
        return loss, {"loss/rf": rf.detach(), "loss/align": align.detach(), "train/align_acc": acc}
