"""Building blocks of the NCSN++ / DDPM++ networks (score_sde), shared by encoders and U-Net.

Written after score_sde's `layerspp.py` and `up_or_down_sampling.py` (Song et al. 2021),
the architecture the Rectified Flow and LZN reference code use, in plain PyTorch:
- `fir_downsample_2d` / `fir_upsample_2d`: the FIR resampling of StyleGAN2/NCSN++
  (`upfirdn2d` with a separable kernel, e.g. (1, 3, 3, 1)) as grouped (transposed) convs.
- `ResBlock`: the BigGAN-style residual block (`ResnetBlockBigGANpp`), optionally
  resampling inside the block and taking a time/condition embedding.
- `SelfAttention2d`: the single-head spatial self-attention of DDPM (`AttnBlockpp`).
- `NCSNppDownPath`: input conv, res blocks per resolution, down-sampling res blocks,
  the optional input-skip pyramid, and the middle block. The U-Net decoder runs it
  with a time embedding and keeps its skips; the NCSN++ encoder runs it without and
  reads latent heads off the same skips.
- `timestep_embedding` / `GaussianFourierProjection`: the two time embeddings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lzn.errors import UserError


# ------------------------------------------------------------------------- initialisers
def variance_scaling_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """score_sde's `default_init`: fan-average uniform variance scaling (Xavier uniform
    with gain sqrt(scale)). A scale of 0 becomes 1e-10 as in score_sde, so blocks start
    as the identity while every parameter upstream still gets a (tiny) gradient."""
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(max(scale, 1e-10)))


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    # score_sde's choice: groups of at least 4 channels, at most 32 groups.
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


# ------------------------------------------------------------------------ FIR resampling
def fir_kernel_2d(taps: Sequence[float]) -> Tensor:
    """Separable, normalised 2-D FIR kernel from 1-D taps: (K,) -> (K, K) summing to 1."""
    k = torch.as_tensor(list(taps), dtype=torch.float64)
    if k.dim() != 1 or k.numel() < 2 or k.numel() % 2 != 0 or float(k.sum()) == 0.0:
        raise UserError(f"fir_kernel must be an even number (>= 2) of taps with a non-zero sum, "
                        f"e.g. (1, 3, 3, 1); got {tuple(taps)}")
    k2 = torch.outer(k, k)
    return (k2 / k2.sum()).float()


def fir_downsample_2d(x: Tensor, kernel: Tensor) -> Tensor:
    """upfirdn2d(x, kernel, down=2): blur with the FIR kernel, keep every second pixel.

    x: (B, C, H, W), kernel: (K, K) -> (B, C, H // 2, W // 2).
    """
    c, k = x.shape[1], kernel.shape[0]
    p = k - 2
    x = F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
    # upfirdn2d convolves (flipped kernel); conv2d correlates.
    w = kernel.flip(0, 1).to(x).expand(c, 1, k, k)
    return F.conv2d(x, w, stride=2, groups=c)


def fir_upsample_2d(x: Tensor, kernel: Tensor) -> Tensor:
    """upfirdn2d(x, 4 * kernel, up=2): zero-insertion then FIR interpolation.

    x: (B, C, H, W), kernel: (K, K) with K even -> (B, C, 2H, 2W). A transposed conv
    with stride 2 is the zero-insertion + convolution without materialising the zeros;
    padding K/2 - 1 reproduces upfirdn2d's pads ((K-2+1)//2 + 1, (K-2)//2).
    """
    c, k = x.shape[1], kernel.shape[0]
    w = (kernel * 4.0).to(x).expand(c, 1, k, k)
    return F.conv_transpose2d(x, w, stride=2, padding=k // 2 - 1, groups=c)


def downsample_2d(x: Tensor, kernel: Tensor | None) -> Tensor:
    """FIR down-sampling when a kernel is given, else 2x2 average pooling (score_sde's naive)."""
    return F.avg_pool2d(x, 2) if kernel is None else fir_downsample_2d(x, kernel)


def upsample_2d(x: Tensor, kernel: Tensor | None) -> Tensor:
    """FIR up-sampling when a kernel is given, else nearest neighbour (score_sde's naive)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if kernel is None else fir_upsample_2d(x, kernel)


# -------------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """BigGAN-style residual block of NCSN++ (`ResnetBlockBigGANpp`).

    forward(x (B, in_ch, H, W), emb (B, emb_dim) or None) -> (B, out_ch, H', W') with
    H' = 2H (up), H / 2 (down) or H. The embedding adds a per-channel bias after the first
    conv; the 1x1 shortcut exists whenever the shape changes, as in score_sde.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, emb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.0,
                 fir_kernel: Tensor | None = None, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.register_buffer("fir_kernel", fir_kernel, persistent=False)
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = conv3x3(in_ch, out_ch)
        self.emb_proj = dense(emb_dim, out_ch) if emb_dim else None
        self.norm_1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.shortcut = conv1x1(in_ch, out_ch) if (in_ch != out_ch or up or down) else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = F.silu(self.norm_0(x))
        if self.up:
            h, x = upsample_2d(h, self.fir_kernel), upsample_2d(x, self.fir_kernel)
        elif self.down:
            h, x = downsample_2d(h, self.fir_kernel), downsample_2d(x, self.fir_kernel)
        h = self.conv_0(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim but got emb=None")
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv_1(self.dropout(F.silu(self.norm_1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        # skip_rescale keeps the variance of the sum at that of one branch.
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class SelfAttention2d(nn.Module):
    """DDPM's single-head self-attention over the H*W positions (`AttnBlockpp`).

    (B, C, H, W) -> (B, C, H, W); q/k/v/out are 1x1 convs (score_sde's NIN layers).
    """

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (conv1x1(channels, channels) for _ in range(3))
        self.out = conv1x1(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C): one head of width C, scale 1/sqrt(C) as in DDPM.
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.out(h.transpose(1, 2).reshape(b, c, hgt, wid))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


# --------------------------------------------------------------------------- embeddings
def timestep_embedding(t: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """DDPM's sinusoidal embedding: t (B,) -> (B, dim), [sin | cos] (zero-padded if odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=t.device))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: s (B,) -> (B, 2 * size), [sin | cos].

    The frequencies are fixed (score_sde never trains them), so they are a buffer.
    """

    def __init__(self, size: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(size) * scale)

    def forward(self, s: Tensor) -> Tensor:
        proj = s[:, None] * self.freqs[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)


# -------------------------------------------------------------------------- down path
class NCSNppDownPath(nn.Module):
    """The contracting half of NCSN++ plus its middle block.

    forward(x (B, channels, R, R), emb (B, emb_dim) or None) -> (skips, h_mid):
    skips is the list of every intermediate map (input conv, each res block, each
    down-sampling block), `skip_channels[i]` / `skip_resolutions[i]` describe skips[i];
    h_mid (B, nf * ch_mult[-1], R_min, R_min) is the output of res-attention-res.
    """

    def __init__(self, *, channels: int, image_size: int, nf: int, ch_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], dropout: float,
                 fir_kernel: Tensor | None, skip_rescale: bool, init_scale: float,
                 input_skip: bool, emb_dim: int | None):
        super().__init__()
        block = dict(emb_dim=emb_dim, dropout=dropout, fir_kernel=fir_kernel,
                     skip_rescale=skip_rescale, init_scale=init_scale)
        self.register_buffer("fir_kernel", fir_kernel, persistent=False)
        self.input_skip = input_skip
        self.conv_in = conv3x3(channels, nf)
        self.skip_channels, self.skip_resolutions = [nf], [image_size]
        self.blocks, self.attns = nn.ModuleList(), nn.ModuleList()
        self.downs, self.combines = nn.ModuleList(), nn.ModuleList()
        in_ch, res = nf, image_size
        for level, mult in enumerate(ch_mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(in_ch, nf * mult, **block))
                in_ch = nf * mult
                attns.append(SelfAttention2d(in_ch, skip_rescale, init_scale)
                             if res in attn_resolutions else nn.Identity())
                self.skip_channels.append(in_ch)
                self.skip_resolutions.append(res)
            self.blocks.append(blocks)
            self.attns.append(attns)
            if level != len(ch_mult) - 1:
                self.downs.append(ResBlock(in_ch, down=True, **block))
                # Input skip: the image, FIR-downsampled to this resolution, mapped by a
                # 1x1 conv and summed in (score_sde's Combine with method "sum").
                if input_skip:
                    self.combines.append(conv1x1(channels, in_ch))
                res //= 2
                self.skip_channels.append(in_ch)
                self.skip_resolutions.append(res)
        self.mid_block_0 = ResBlock(in_ch, **block)
        self.mid_attn = SelfAttention2d(in_ch, skip_rescale, init_scale)
        self.mid_block_1 = ResBlock(in_ch, **block)
        self.out_channels = in_ch

    def forward(self, x: Tensor, emb: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        pyramid = x
        skips = [self.conv_in(x)]
        for level, (blocks, attns) in enumerate(zip(self.blocks, self.attns)):
            for block, attn in zip(blocks, attns):
                skips.append(attn(block(skips[-1], emb)))
            if level < len(self.downs):
                h = self.downs[level](skips[-1], emb)
                if self.input_skip:
                    pyramid = downsample_2d(pyramid, self.fir_kernel)
                    h = h + self.combines[level](pyramid)
                skips.append(h)
        h = self.mid_block_1(self.mid_attn(self.mid_block_0(skips[-1], emb)), emb)
        return skips, h


# ------------------------------------------------------------------ construction checks
def check_backbone(*, image_size: int, channels: int, nf: int, ch_mult: tuple[int, ...],
                   num_res_blocks: int, dropout: float) -> None:
    """UserErrors for sizes an NCSN++ backbone cannot be built with (shared with encoders)."""
    if channels < 1:
        raise UserError(f"channels must be >= 1, got {channels}")
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise UserError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult}")
    down = 2 ** (len(ch_mult) - 1)
    if image_size < down or image_size % down:
        raise UserError(f"image_size must be a positive multiple of 2^(len(ch_mult) - 1) = {down} "
                        f"for ch_mult {ch_mult}, got {image_size}")
    if nf < 4 or nf % 4:
        raise UserError(f"nf must be a positive multiple of 4 (GroupNorm groups of 4 channels), got {nf}")
    if num_res_blocks < 1:
        raise UserError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")


def replace_config(config: Any, overrides: dict[str, Any]) -> Any:
    """dataclasses.replace with a UserError naming unknown keys and the valid ones."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown override(s) {unknown} for {type(config).__name__}; "
                        f"valid keys: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)
