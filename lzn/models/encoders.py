"""Image encoders: images (B, C, H, W) in [-1, 1] -> LZN anchors (B, latent_dim).

Every encoder also has `features(images) -> (B, F)`: the backbone output before the latent
head, what a linear probe reads. Three families:
- `DigitsCNN` ("digits_cnn"): a small conv net for the 1x8x8 scikit-learn digits.
- `NCSNppEncoder` ("ncsnpp_cifar10", "ncsnpp_256"): the NCSN++ down path without time
  input, with LZN's multi-scale latent heads: after the input conv, each res block, each
  down-sampling block and the middle block, a head (1x1 conv to 20 channels, swish, MLP
  20*res^2 -> 200 -> latent_dim) maps the feature map to a latent; the heads are summed.
  `head_resolutions` restricts the heads to some resolutions (the 256px preset: 64..4).
- `ResNet50GN` ("resnet50_gn"): torchvision's ResNet-50 with GroupNorm(32) instead of
  BatchNorm, fc removed, and a head Linear-GN-ReLU-Linear-GN (case study 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn
from torchvision.models import resnet50

from lzn.errors import UserError
from lzn.models.layers import NCSNppDownPath, check_backbone, conv1x1, fir_kernel_2d, replace_config


def _check_images(images: Tensor, channels: int, image_size: int) -> None:
    want = (channels, image_size, image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(images.shape)}")


def _check_latent_dim(latent_dim: int) -> None:
    if latent_dim < 1:
        raise UserError(f"latent_dim must be >= 1, got {latent_dim}")


# ------------------------------------------------------------------------------ digits
@dataclass(frozen=True)
class DigitsCNNConfig:
    widths: tuple[int, int, int] = (32, 48, 96)  # the last width is the feature dim
    head_hidden: int = 96
    groups: int = 8


class DigitsCNN(nn.Module):
    """Three 3x3 conv stages (8x8 -> 4x4 -> 2x2), GroupNorm + SiLU, global average pool.

    features: (B, widths[-1]); forward: features -> MLP -> (B, latent_dim).
    """

    def __init__(self, config: DigitsCNNConfig, *, latent_dim: int, image_size: int, channels: int):
        super().__init__()
        _check_latent_dim(latent_dim)
        if len(config.widths) != 3 or any(w < 1 or w % config.groups for w in config.widths):
            raise UserError(f"widths must be 3 positive multiples of groups={config.groups}, got {config.widths}")
        if image_size < 4 or channels < 1:
            raise UserError(f"need image_size >= 4 and channels >= 1, got image_size={image_size}, "
                            f"channels={channels}")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        layers: list[nn.Module] = []
        in_ch = channels
        for i, width in enumerate(config.widths):
            layers += [nn.Conv2d(in_ch, width, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(config.groups, width), nn.SiLU()]
            in_ch = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_ch
        self.head = nn.Sequential(nn.Linear(in_ch, config.head_hidden), nn.SiLU(),
                                  nn.Linear(config.head_hidden, latent_dim))

    def features(self, images: Tensor) -> Tensor:
        _check_images(images, self.channels, self.image_size)
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


# ----------------------------------------------------------------------------- NCSN++
@dataclass(frozen=True)
class NCSNppEncoderConfig:
    """NCSN++ down path (score_sde field names) and LZN's latent heads."""

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.15
    fir: bool = False
    fir_kernel: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    skip_rescale: bool = True
    init_scale: float = 0.0
    input_skip: bool = False
    head_channels: int = 20  # the 1x1 conv of each head
    head_hidden: int = 200  # the MLP's hidden width
    head_resolutions: tuple[int, ...] | None = None  # None: a head on every feature map


class NCSNppEncoder(nn.Module):
    """NCSN++ down path + summed multi-scale latent heads.

    forward: (B, C, R, R) -> (B, latent_dim). features: the middle block's output,
    average-pooled, (B, nf * ch_mult[-1]): the deepest backbone map before any head.
    """

    def __init__(self, config: NCSNppEncoderConfig, *, latent_dim: int, image_size: int, channels: int):
        super().__init__()
        cfg = config
        _check_latent_dim(latent_dim)
        check_backbone(image_size=image_size, channels=channels, nf=cfg.nf, ch_mult=cfg.ch_mult,
                       num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.down = NCSNppDownPath(
            channels=channels, image_size=image_size, nf=cfg.nf, ch_mult=cfg.ch_mult,
            num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout,
            fir_kernel=fir_kernel_2d(cfg.fir_kernel) if cfg.fir else None, skip_rescale=cfg.skip_rescale,
            init_scale=cfg.init_scale, input_skip=cfg.input_skip, emb_dim=None)
        # One entry per feature map: the skips of the down path, then the middle block.
        map_channels = [*self.down.skip_channels, self.down.out_channels]
        map_resolutions = [*self.down.skip_resolutions, self.down.skip_resolutions[-1]]
        if cfg.head_resolutions is not None and not set(cfg.head_resolutions) & set(map_resolutions):
            raise UserError(f"head_resolutions {cfg.head_resolutions} match none of the feature map "
                            f"resolutions {sorted(set(map_resolutions))} of image_size {image_size}")
        self.head_maps: list[int] = []
        self.heads = nn.ModuleList()
        for i, (ch, res) in enumerate(zip(map_channels, map_resolutions)):
            if cfg.head_resolutions is None or res in cfg.head_resolutions:
                self.head_maps.append(i)
                self.heads.append(nn.Sequential(
                    conv1x1(ch, cfg.head_channels), nn.SiLU(), nn.Flatten(),
                    nn.Linear(cfg.head_channels * res * res, cfg.head_hidden), nn.SiLU(),
                    nn.Linear(cfg.head_hidden, latent_dim)))
        self.feature_dim = self.down.out_channels

    def _maps(self, images: Tensor) -> list[Tensor]:
        _check_images(images, self.channels, self.image_size)
        skips, h = self.down(images)
        return [*skips, h]

    def features(self, images: Tensor) -> Tensor:
        return self._maps(images)[-1].mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        maps = self._maps(images)
        # A sum rather than a stack: only one (B, latent_dim) accumulator stays alive.
        out = self.heads[0](maps[self.head_maps[0]])
        for i, head in zip(self.head_maps[1:], self.heads[1:]):
            out = out + head(maps[i])
        return out


# ----------------------------------------------------------------------------- ResNet
@dataclass(frozen=True)
class ResNet50GNConfig:
    groups: int = 32
    head_hidden: int = 2048
    # Zero-init the last norm of each bottleneck (as the LZN/SimCLR ResNet does):
    # every residual branch starts as the identity.
    zero_init_residual: bool = True


class ResNet50GN(nn.Module):
    """torchvision ResNet-50, GroupNorm for BatchNorm, fc removed, + projection head.

    features: (B, 2048) pooled backbone output. forward: features -> Linear(2048, hidden,
    no bias), GN, ReLU, Linear(hidden, latent_dim, no bias), GN -> (B, latent_dim). The
    Linears have no bias because a GroupNorm follows each (as in the LZN reference).
    Images in [-1, 1] are mapped to [0, 1] first, the input range of SimCLR-style ResNets.
    """

    def __init__(self, config: ResNet50GNConfig, *, latent_dim: int, image_size: int, channels: int):
        super().__init__()
        _check_latent_dim(latent_dim)
        g = config.groups
        if latent_dim % g or config.head_hidden % g:
            raise UserError(f"latent_dim ({latent_dim}) and head_hidden ({config.head_hidden}) must be "
                            f"multiples of groups={g} for the head's GroupNorm")
        if image_size < 32 or channels < 1:
            raise UserError(f"need image_size >= 32 (five stride-2 stages) and channels >= 1, "
                            f"got image_size={image_size}, channels={channels}")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.backbone = resnet50(weights=None, norm_layer=partial(nn.GroupNorm, g),
                                 zero_init_residual=config.zero_init_residual)
        if channels != 3:
            self.backbone.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone.fc = nn.Identity()
        self.feature_dim = 2048
        self.head = nn.Sequential(
            nn.Linear(2048, config.head_hidden, bias=False), nn.GroupNorm(g, config.head_hidden), nn.ReLU(),
            nn.Linear(config.head_hidden, latent_dim, bias=False), nn.GroupNorm(g, latent_dim))

    def features(self, images: Tensor) -> Tensor:
        _check_images(images, self.channels, self.image_size)
        return self.backbone((images + 1.0) / 2.0)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


# ---------------------------------------------------------------------------- presets
ENCODER_PRESETS: dict[str, tuple[type[nn.Module], object]] = {
    "digits_cnn": (DigitsCNN, DigitsCNNConfig()),
    # Paper (CS1/CS3 CIFAR10): 49.8M params with latent_dim 200.
    "ncsnpp_cifar10": (NCSNppEncoder, NCSNppEncoderConfig()),
    # Paper (CS1 256px): 87.8M params with latent_dim 200.
    "ncsnpp_256": (NCSNppEncoder, NCSNppEncoderConfig(
        ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0, fir=True, input_skip=True,
        head_resolutions=(64, 32, 16, 8, 4))),
    # A CPU-sized NCSN++ for <= 32 px (lzn.models.presets): one block per level, narrow heads.
    "ncsnpp_tiny": (NCSNppEncoder, NCSNppEncoderConfig(
        nf=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, head_channels=8,
        head_hidden=64)),
    # 65-128 px: the 256 px encoder's widths at each resolution from 128 down (one level fewer).
    "ncsnpp_128": (NCSNppEncoder, NCSNppEncoderConfig(
        ch_mult=(1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0, fir=True, input_skip=True,
        head_resolutions=(64, 32, 16, 8, 4))),
    # Paper (CS2 ImageNet): "24.0M" params with latent_dim 256; see tests for the real count.
    "resnet50_gn": (ResNet50GN, ResNet50GNConfig()),
}


def build_encoder_preset(preset: str, *, latent_dim: int, image_size: int, channels: int,
                         **overrides) -> nn.Module:
    """An encoder from a preset name, with config fields replaced by `overrides`."""
    if preset not in ENCODER_PRESETS:
        raise UserError(f"unknown encoder preset {preset!r}; known: {sorted(ENCODER_PRESETS)}")
    cls, config = ENCODER_PRESETS[preset]
    return cls(replace_config(config, overrides), latent_dim=latent_dim, image_size=image_size,
               channels=channels)
