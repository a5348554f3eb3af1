"""Pixel features: the Fréchet distance of images in pixel space, with no network.

FID's Inception weights are a file a user may not have (nothing is downloaded at run
time), and no pretrained network exists for a new user's 16 px images. `PixelFeatures`
maps images (B, C, H, W) in [-1, 1] to their area-averaged 8 x 8 thumbnails flattened,
(B, C * 64) (smaller images: their own H x W pixels): the Fréchet distance between two sets
is then that of Gaussians fitted to their coarse pixel statistics (colour, layout). It
tracks a model's progress on any images; it is not comparable to an Inception FID, nor
across image sizes or channels.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

PIXELS_NAME = "pixels8"
THUMBNAIL = 8


class PixelFeatures(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> (B, C * min(H, 8) * min(W, 8)) float32 thumbnails."""

    name = PIXELS_NAME

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        size = (min(images.shape[2], THUMBNAIL), min(images.shape[3], THUMBNAIL))
        return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def pixel_extractor() -> PixelFeatures:
    """The "pixels" FID extractor (reported as "pixels8")."""
    return PixelFeatures()
