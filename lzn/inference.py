"""Inference on a trained objective: generate, embed, latents, classify, reconstruct.

LZN latents depend on the inference batch: an image's latent is computed in the flow of
the anchors of the images it is batched with. So the inference batch size (and alpha) are
explicit arguments everywhere, and evaluations log them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lzn import sampling, seeds
from lzn.errors import UserError
from lzn.objectives import GenerationObjective, JointObjective
from lzn.objectives.base import state_dtype
from lzn.zoning import assign_zones, compute_latents


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """(n,) labels with every class exactly n // num_classes times: label i % num_classes for
    sample i, so the first n % num_classes classes get one more, and every inference batch of
    a multiple of num_classes samples is balanced too."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"balanced_labels needs n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    return torch.arange(n) % num_classes


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, n, batch_size):
        yield slice(lo, min(lo + batch_size, n))


class LZNModel:
    """A trained objective (usually its EMA copy) with the inference API.

    image_shape: (C, H, W) of the images it generates.
    """

    def __init__(self, objective: nn.Module, image_shape: tuple[int, int, int], device="cpu"):
        self.objective = objective.eval().to(device)
        self.image_shape = tuple(image_shape)
        self.device = torch.device(device)

    def _require(self, name: str) -> nn.Module:
        if not hasattr(self.objective, name):
            raise ValueError(f"this model ({type(self.objective).__name__}) has no {name}")
        return getattr(self.objective, name)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def embed(self, images: Tensor, *, batch_size: int = 256) -> Tensor:
        """Backbone features (N, F) of images (N, C, H, W): what the linear probe reads."""
        enc = self._require("encoder")
        return torch.cat([enc.features(images[s].to(self.device)).float().cpu()
                          for s in _batches(len(images), batch_size)])

    @torch.no_grad()
    def latents(self, images: Tensor, *, batch_size: int, alpha: float | None = None, seed: int = 0,
                first_batch: int = 0) -> Tensor:
        """LZN latents (N, q), each computed in the flow of its inference batch of `batch_size`.

        first_batch: the global index of the first batch, for a shard of a larger set that starts
        at image `first_batch * batch_size`: its latents equal that slice of the whole set's."""
        enc, cfg = self._require("encoder"), self.objective.latent
        alpha = cfg.alpha if alpha is None else alpha
        out = []
        for i, s in enumerate(_batches(len(images), batch_size)):
            anchors = enc(images[s].to(self.device)).float()
            noise = sampling.seeded_normal(seeds.latent_noise(seed, first_batch + i), *anchors.shape,
                                           device=self.device)
            out.append(compute_latents(anchors, noise, steps=cfg.steps, solver=cfg.solver,
                                       alpha=alpha, eps=cfg.eps, state_dtype=state_dtype(cfg)).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ joint (CS3)
    def _label_flow(self):
        obj = self.objective
        if not isinstance(obj, JointObjective):
            raise ValueError(f"classification needs label anchors (a joint model), not {type(obj).__name__}")
        return obj.labels().detach().float(), obj.align

    @torch.no_grad()
    def classify(self, images: Tensor, *, batch_size: int, alpha: float | None = None, first_batch: int = 0) -> Tensor:
        """Predicted labels (N,): flow each image latent through the label flow (uniform weights)."""
        label_anchors, align = self._label_flow()
        z = self.latents(images, batch_size=batch_size, alpha=alpha, first_batch=first_batch).to(self.device)
        return assign_zones(z, label_anchors, steps=align.steps, solver=align.solver, eps=align.eps).cpu()

    @torch.no_grad()
    def label_latents(self, labels: Tensor, *, seed: int = 0, alpha: float = 1.0) -> Tensor:
        """Latents (N, q) drawn inside each label's zone of the label flow (uniform weights),
        from g = align.zone_eps (1e-4, as the reference) rather than the alignment's eps."""
        label_anchors, align = self._label_flow()
        if not 0 < align.zone_eps < 1:
            raise UserError(f"align.zone_eps must lie in (0, 1), got {align.zone_eps}")
        labels = labels.to(self.device)
        noise = sampling.seeded_normal(seed, len(labels), label_anchors.shape[1], device=self.device)
        return compute_latents(label_anchors[labels], noise, steps=align.steps, solver=align.solver,
                               alpha=alpha, eps=align.zone_eps, flow_anchors=label_anchors)

    # ------------------------------------------------------------------ decoders
    def _condition(self, z: Tensor | None, labels: Tensor | None) -> Tensor | None:
        obj = self.objective
        if isinstance(obj, JointObjective):
            return obj.condition(z, labels.to(z.device))
        return z

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None = None, *, method: str = "euler", steps: int = 10,
                 batch_size: int = 256, seed: int = 0, first_batch: int = 0) -> Tensor:
        """n images (n, C, H, W) in [-1, 1]. A joint model takes `labels` (n,) (None:
        `balanced_labels`, every class equally often).

        Batch i's noise is seeded by (seed, first_batch + i): a shard that starts at sample
        `first_batch * batch_size` generates exactly that slice of the whole set."""
        decoder = self._require("decoder")
        obj = self.objective
        if isinstance(obj, JointObjective) and labels is None:
            labels = balanced_labels(n, obj.num_classes)
        if labels is not None and not isinstance(obj, JointObjective):
            raise ValueError("labels given, but this model is not class-conditional (not a joint model)")
        out = []
        for i, s in enumerate(_batches(n, batch_size), start=first_batch):
            m = s.stop - s.start
            noise = sampling.seeded_normal(seeds.sample_noise(seed, i), m, *self.image_shape, device=self.device)
            z = None
            if isinstance(obj, JointObjective):
                z = self.label_latents(labels[s], seed=seeds.sample_latents(seed, i))
            elif isinstance(obj, GenerationObjective) and obj.uses_lzn:
                # LZN latents are N(0, I) by construction: sample them directly.
                z = sampling.seeded_normal(seeds.sample_latents(seed, i), m, obj.latent.dim, device=self.device)
            cond = self._condition(z, labels[s] if labels is not None else None)
            out.append(sampling.sample(decoder, noise, cond, method=method, steps=steps).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, labels: Tensor | None = None, *, batch_size: int,
                    method: str = "euler", steps: int = 10, first_batch: int = 0, alpha: float | None = None,
                    seed: int = 0) -> Tensor:
        """Invert the image ODE with the image's own LZN latent, then integrate back.

        seed, alpha: those of the latents (`latents`); another seed is another draw of the
        latent noise, so another latent in the image's zone and another reconstruction."""
        decoder = self._require("decoder")
        z = self.latents(images, batch_size=batch_size, alpha=alpha, seed=seed, first_batch=first_batch)
        out = []
        for s in _batches(len(images), batch_size):
            x = images[s].to(self.device)
            cond = self._condition(z[s].to(self.device), labels[s] if labels is not None else None)
            noise = sampling.invert(decoder, x, cond, method=method, steps=steps)
            out.append(sampling.sample(decoder, noise, cond, method=method, steps=steps).cpu())
        return torch.cat(out)
