"""The Rectified Flow U-Net decoder D(x_t, t, cond) -> velocity, NCSN++ / DDPM++ style.

The architecture is score_sde's NCSN++ as the Rectified Flow and LZN reference code use
it (BigGAN res blocks, attention at chosen resolutions, optional FIR resampling with the
input-skip / output-skip pyramids of the 256px configs). LZN's change: the conditioning
vector (the LZN latent, plus a one-hot label in the joint case study) is concatenated to
the time embedding before the embedding MLP, so every res block sees it through the same
per-channel bias as the time.

Presets (`UNET_PRESETS`; parameter counts for 3 channels and cond_dim 200):
- "unet_digits": tiny, for 1x8x8 digits on a laptop CPU (189k params at 1 channel, cond 4).
- "unet_tiny": for 8-32 px on a CPU (nf 16, ch_mult 1,2,4, 1 block): 757,603 at 32 px.
- "ncsnpp_128": the 256 px network's widths per resolution from 128 down: 62,568,338 at 128 px.
- "ddpmpp_cifar10": RF's CIFAR10 DDPM++ (nf 128, ch_mult 1,2,2,2, 4 blocks, attn 16,
  dropout 0.15, positional time embedding, skip_rescale): 61,906,819. Paper: 61.9M.
- "ncsnpp_256": score_sde's CelebA-HQ NCSN++ (Fourier embedding, ch_mult 1,1,2,2,2,2,2,
  2 blocks, attn 16, FIR, output skip, input skip, scale_by_sigma): 65,676,821. Paper: 65.7M.

Time: t in [0, 1] (t = 1 at the data, as in the RF objective and the references) is
embedded as 999 t (positional) or log(999 t) (Fourier), as in the references.
`scale_by_sigma` divides the output by 999 t, as the reference's 256px configs do
(`scale_by_sigma=True` in its AFHQ, CelebA-HQ and LSUN configs, off for CIFAR10 and the
joint case study): a parametrisation inherited from score_sde, where sigma scales the
score; here the network learns 999 t times the velocity, up to 999 times it near the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lzn.errors import UserError
from lzn.models.layers import (
    GaussianFourierProjection,
    NCSNppDownPath,
    ResBlock,
    SelfAttention2d,
    check_backbone,
    conv3x3,
    dense,
    fir_kernel_2d,
    group_norm,
    replace_config,
    timestep_embedding,
    upsample_2d,
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the NCSN++ U-Net; the field names follow score_sde's config."""

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    skip_rescale: bool = True
    init_scale: float = 0.0
    output_skip: bool = False  # score_sde progressive="output_skip"
    input_skip: bool = False  # score_sde progressive_input="input_skip", combine "sum"
    embedding: str = "positional"  # "positional" | "fourier"
    fourier_scale: float = 16.0
    # RF feeds the network 999 t (the DDPM step scale the embeddings were designed for).
    time_scale: float = 999.0
    # Divide the output by time_scale * t (score_sde's "sigma" of the Fourier embedding).
    scale_by_sigma: bool = False


UNET_PRESETS: dict[str, UNetConfig] = {
    # ~0.19M params: one block per level keeps a CPU step at ~50 ms for a batch of 16.
    "unet_digits": UNetConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                              dropout=0.0),
    # A CPU-sized U-Net for <= 32 px (lzn.models.presets), attention at the lowest resolution.
    "unet_tiny": UNetConfig(nf=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
    "ddpmpp_cifar10": UNetConfig(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                                 dropout=0.15),
    "ncsnpp_256": UNetConfig(nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.0, fir=True, output_skip=True,
                             input_skip=True, embedding="fourier", scale_by_sigma=True),
    # 65-128 px: the 256 px network's widths at each resolution from 128 down (one level fewer).
    "ncsnpp_128": UNetConfig(nf=128, ch_mult=(1, 2, 2, 2, 2, 2), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.0, fir=True, output_skip=True,
                             input_skip=True, embedding="fourier", scale_by_sigma=True),
}


class NCSNppUNet(nn.Module):
    """forward(x_t (B, C, R, R), t (B,) in [0, 1], cond (B, cond_dim) or None) -> (B, C, R, R).

    cond_dim = 0 builds the unconditional network (plain RF baseline): cond must be None.
    """

    def __init__(self, config: UNetConfig, *, image_size: int, channels: int, cond_dim: int):
        super().__init__()
        cfg = config
        check_backbone(image_size=image_size, channels=channels, nf=cfg.nf, ch_mult=cfg.ch_mult,
                       num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout)
        if cond_dim < 0:
            raise UserError(f"cond_dim must be >= 0 (0 = unconditional), got {cond_dim}")
        if cfg.embedding not in ("positional", "fourier"):
            raise UserError(f"embedding must be 'positional' or 'fourier', got {cfg.embedding!r}")
        self.config, self.image_size, self.channels, self.cond_dim = cfg, image_size, channels, cond_dim
        nf = cfg.nf
        kernel = fir_kernel_2d(cfg.fir_kernel) if cfg.fir else None
        self.register_buffer("fir_kernel", kernel, persistent=False)

        self.fourier = GaussianFourierProjection(nf, cfg.fourier_scale) if cfg.embedding == "fourier" else None
        time_dim = 2 * nf if self.fourier is not None else nf
        self.emb_mlp = nn.Sequential(dense(time_dim + cond_dim, 4 * nf), nn.SiLU(), dense(4 * nf, 4 * nf))

        block = dict(emb_dim=4 * nf, dropout=cfg.dropout, fir_kernel=kernel,
                     skip_rescale=cfg.skip_rescale, init_scale=cfg.init_scale)
        self.down = NCSNppDownPath(channels=channels, image_size=image_size, nf=nf, ch_mult=cfg.ch_mult,
                                   num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions,
                                   input_skip=cfg.input_skip, **block)
        skip_ch = list(self.down.skip_channels)
        in_ch, res = self.down.out_channels, image_size // 2 ** (len(cfg.ch_mult) - 1)
        self.up_blocks, self.up_attns = nn.ModuleList(), nn.ModuleList()
        self.out_skips, self.ups = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(cfg.ch_mult))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(in_ch + skip_ch.pop(), nf * cfg.ch_mult[level], **block))
                in_ch = nf * cfg.ch_mult[level]
            self.up_blocks.append(blocks)
            self.up_attns.append(SelfAttention2d(in_ch, cfg.skip_rescale, cfg.init_scale)
                                 if res in cfg.attn_resolutions else nn.Identity())
            if cfg.output_skip:
                # Output skip: every resolution adds its own RGB prediction to the upsampled
                # pyramid; the full-resolution pyramid is the output.
                self.out_skips.append(nn.Sequential(group_norm(in_ch), nn.SiLU(),
                                                    conv3x3(in_ch, channels, init_scale=cfg.init_scale)))
            if level != 0:
                self.ups.append(ResBlock(in_ch, up=True, **block))
                res *= 2
        assert not skip_ch
        self.head = (None if cfg.output_skip else
                     nn.Sequential(group_norm(in_ch), nn.SiLU(), conv3x3(in_ch, channels, cfg.init_scale)))

    # --------------------------------------------------------------------------------
    def _check_inputs(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != want:
            raise ValueError(f"x_t must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) (one time per image), got {tuple(t.shape)}")
        if self.cond_dim == 0:
            if cond is not None:
                raise ValueError(f"this decoder is unconditional (cond_dim=0) but got cond of shape "
                                 f"{tuple(cond.shape)}; pass cond=None or build it with cond_dim > 0")
        elif cond is None:
            raise ValueError(f"this decoder is conditional (cond_dim={self.cond_dim}) but got cond=None; "
                             f"expected a tensor of shape ({b}, {self.cond_dim})")
        elif cond.shape != (b, self.cond_dim):
            raise ValueError(f"cond must have shape ({b}, {self.cond_dim}), got {tuple(cond.shape)}")

    def sigma(self, t: Tensor) -> Tensor:
        """(B,) times in [0, 1] -> (B,) network times time_scale * t, floored at 1e-3 so that
        t = 0 stays finite (the reference takes log(0) and divides by 0 there)."""
        return (t.clamp(0.0, 1.0) * self.config.time_scale).clamp_min(1e-3)

    def embed(self, t: Tensor, cond: Tensor | None) -> Tensor:
        """Time (B,) and condition (B, cond_dim) -> the embedding every block sees, (B, 4 nf)."""
        if self.fourier is not None:
            # score_sde embeds log(sigma).
            temb = self.fourier(torch.log(self.sigma(t)))
        else:
            temb = timestep_embedding(t.clamp(0.0, 1.0) * self.config.time_scale, self.config.nf)
        temb = temb.to(self.emb_mlp[0].weight.dtype)
        if cond is not None:
            temb = torch.cat([temb, cond.to(temb.dtype)], dim=1)
        return self.emb_mlp(temb)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check_inputs(x_t, t, cond)
        emb = self.embed(t, cond)
        skips, h = self.down(x_t, emb)
        pyramid = None
        for i, (blocks, attn) in enumerate(zip(self.up_blocks, self.up_attns)):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = attn(h)
            if self.config.output_skip:
                rgb = self.out_skips[i](h)
                pyramid = rgb if pyramid is None else upsample_2d(pyramid, self.fir_kernel) + rgb
            if i < len(self.ups):
                h = self.ups[i](h, emb)
        assert not skips
        out = pyramid if self.head is None else self.head(h)
        if self.config.scale_by_sigma:
            out = out / self.sigma(t).to(out.dtype).view(-1, 1, 1, 1)
        return out


def build_unet(preset: str, *, image_size: int, channels: int, cond_dim: int, **overrides) -> NCSNppUNet:
    """A U-Net from a preset name, with config fields replaced by `overrides`."""
    if preset not in UNET_PRESETS:
        raise UserError(f"unknown U-Net preset {preset!r}; known: {sorted(UNET_PRESETS)}")
    return NCSNppUNet(replace_config(UNET_PRESETS[preset], overrides), image_size=image_size,
                      channels=channels, cond_dim=cond_dim)

