"""Learnable label anchors of the joint case study (CS3): one LZN anchor per class."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lzn.errors import UserError


class LabelAnchors(nn.Module):
    """A learnable (num_classes, latent_dim) matrix, initialised standard normal.

    forward() -> (num_classes, latent_dim): the anchors of the label flow. They take the
    place of an encoder for the label data type: image latents are aligned to the zone of
    their label's anchor, and classification flows an image latent back to the nearest one.
    """

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise UserError(f"num_classes must be an int >= 2 (zones need at least two anchors), "
                            f"got {num_classes!r}")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise UserError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.anchors = nn.Parameter(torch.randn(num_classes, latent_dim))

    def forward(self) -> Tensor:
        return self.anchors

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, latent_dim={self.latent_dim}"
