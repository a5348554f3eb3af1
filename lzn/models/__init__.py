"""The LZN model zoo: encoders (images -> anchors), the RF U-Net decoder, label anchors.

Explicit registries from a human name to a builder (STYLE.md #5); configs name presets,
never import paths:

    encoder = build_encoder("ncsnpp_cifar10", latent_dim=200, image_size=32, channels=3)
    decoder = build_decoder("ddpmpp_cifar10", image_size=32, channels=3, cond_dim=200)

`model.encoder=auto` / `decoder=auto` pick these by image size (`lzn.models.presets`).
`overrides` replace fields of the preset's config dataclass (`NCSNppEncoderConfig`,
`UNetConfig`, ...), e.g. `build_decoder("ddpmpp_cifar10", ..., dropout=0.0)`; an unknown
key is a ValueError listing the valid ones.

| name | kind | paper params | ours (3 ch, q = 200, ResNet q = 256) |
| --- | --- | --- | --- |
| digits_cnn | encoder, 1x8x8 | - | 66,976 (1 ch, q = 16) |
| ncsnpp_tiny | encoder, <= 32 px (CPU) | - | 859,184 (32 px, `model.encoder=auto`'s heads) |
| ncsnpp_128 | encoder, 96-128 px | - | 86,864,832 (128 px) |
| ncsnpp_cifar10 | encoder | 49.8M | 49,790,260 |
| ncsnpp_256 | encoder | 87.8M | 87,768,896 |
| resnet50_gn | encoder | 24.0M | 28,231,232 (the described head adds 4.7M) |
| unet_digits | decoder, 1x8x8 | - | 189,025 (1 ch, cond 4) |
| unet_tiny | decoder, <= 32 px (CPU) | - | 757,603 (32 px) |
| ncsnpp_128 | decoder, 96-128 px | - | 62,568,338 (128 px) |
| ddpmpp_cifar10 | decoder | 61.9M | 61,906,819 (cond 200) |
| ncsnpp_256 | decoder | 65.7M | 65,676,821 (cond 200) |
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lzn.errors import UserError
from lzn.models.anchors import LabelAnchors
from lzn.models.encoders import ENCODER_PRESETS, build_encoder_preset
from lzn.models.unet import UNET_PRESETS, NCSNppUNet, build_unet

__all__ = ["DECODERS", "ENCODERS", "LabelAnchors", "build_decoder", "build_encoder"]


def _encoder_builder(preset: str) -> Callable[..., nn.Module]:
    def build(*, latent_dim: int, image_size: int, channels: int, **overrides: Any) -> nn.Module:
        return build_encoder_preset(preset, latent_dim=latent_dim, image_size=image_size,
                                    channels=channels, **overrides)
    build.__doc__ = f"Build the {preset!r} encoder."
    return build


def _decoder_builder(preset: str) -> Callable[..., NCSNppUNet]:
    def build(*, image_size: int, channels: int, cond_dim: int, **overrides: Any) -> NCSNppUNet:
        return build_unet(preset, image_size=image_size, channels=channels, cond_dim=cond_dim, **overrides)
    build.__doc__ = f"Build the {preset!r} U-Net decoder."
    return build


ENCODERS: dict[str, Callable[..., nn.Module]] = {name: _encoder_builder(name) for name in ENCODER_PRESETS}
DECODERS: dict[str, Callable[..., NCSNppUNet]] = {name: _decoder_builder(name) for name in UNET_PRESETS}


def build_encoder(name: str, *, latent_dim: int, image_size: int, channels: int, **overrides: Any) -> nn.Module:
    """Encoder `name`: forward(images (B, C, H, W) in [-1, 1]) -> (B, latent_dim), plus
    features(images) -> (B, F)."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; known encoders: {sorted(ENCODERS)}")
    return ENCODERS[name](latent_dim=latent_dim, image_size=image_size, channels=channels, **overrides)


def build_decoder(name: str, *, image_size: int, channels: int, cond_dim: int, **overrides: Any) -> NCSNppUNet:
    """Decoder `name`: forward(x_t (B, C, H, W), t (B,), cond (B, cond_dim) or None) -> (B, C, H, W)."""
    if name not in DECODERS:
        raise UserError(f"unknown decoder {name!r}; known decoders: {sorted(DECODERS)}")
    return DECODERS[name](image_size=image_size, channels=channels, cond_dim=cond_dim, **overrides)
