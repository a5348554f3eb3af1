"""lzn.data.transforms one image at a time with Python-number parameters: the CPU route.

On a CPU core a batch of views goes fastest image by image (lzn.data.augment's
`SimCLRTwoView` on a CPU device): one image's planes (3 x 224 x 224 float32, 600 KB) stay in
the core's L2 cache through every op, and a sample whose coin says no (no jitter, no
grayscale, a hue in another slot) costs nothing, where a batch has to compute every op for
all its samples and mask. Selections use float masks through `lerp` (exact at weights 0 and
1): on a CPU, torch's comparisons into bool tensors and `where` on them run ~30x slower
than arithmetic, and `remainder` ~10x. Each op is torchvision.transforms.v2.functional's of
the same name to float32 rounding (tests/lzn/data/test_image_ops.py holds each to it).
Images: (C, H, W) float in [0, 1], C = 1 or 3; ops ending in _ work in place.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from lzn.data.transforms import LUMA

# Blur taps below this weight are dropped: all of them together move a pixel in [0, 1] by
# < 2^-35 (~3e-11), under float32's rounding of any value above 2^-12; the taps kept carry
# torchvision's weights unchanged. Small sigmas keep a few taps of the 23 (and no taps
# whose products are subnormal, which x86 multiplies ~100x slower).
TAP_FLOOR = 2.0 ** -40


class Workspace:
    """Scratch tensors reused from image to image (one per caller and thread): a fresh
    buffer of ~1 MB costs its page faults every time on a CPU, ~10% of a view here."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self._flat = dtype, {}

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised tensor of `shape`, the same memory for `name` on every call."""
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n:
            flat = self._flat[name] = torch.empty(n, dtype=self.dtype)
        return flat[:n].view(shape)


def _scratch(work: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype) if work is None else work.get(name, shape)


def gray_plane(x: Tensor, work: Workspace | None = None) -> Tensor:
    """(1, H, W) luma of a 3-channel image, torchvision's sum in torchvision's order."""
    r, g, b = x
    out = _scratch(work, "gray", (1, *x.shape[1:]), x.dtype)
    return torch.mul(r, LUMA[0], out=out[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(0)


def brightness_(x: Tensor, factor: float, work: Workspace | None = None) -> Tensor:
    """F.adjust_brightness: factor x clamped to [0, 1]."""
    return x.mul_(factor).clamp_(0, 1)


def contrast_(x: Tensor, factor: float, work: Workspace | None = None) -> Tensor:
    """F.adjust_contrast: blend with the mean of the image's grayscale."""
    mean = (gray_plane(x, work) if x.shape[0] == 3 else x).mean()
    return x.mul_(factor).add_(mean, alpha=1.0 - factor).clamp_(0, 1)


def saturation_(x: Tensor, factor: float, work: Workspace | None = None) -> Tensor:
    """F.adjust_saturation: blend with the image's grayscale; a 1-channel image is unchanged."""
    if x.shape[0] == 1:
        return x
    gray = gray_plane(x, work)  # before x changes
    return x.mul_(factor).add_(gray, alpha=1.0 - factor).clamp_(0, 1)


def hue_(x: Tensor, shift: float, work: Workspace | None = None) -> Tensor:
    """F.adjust_hue by `shift` turns in [-0.5, 0.5]; a 1-channel image has no hue.

    As torchvision's RGB -> HSV -> RGB round trip, keeping value (max) and chroma (max - min):
    the hue in sixths of a turn comes from the sector of the largest channel (red first, then
    green, as torchvision breaks ties; a grey pixel gets 0), turned and wrapped to [0, 6), and
    each channel is min + chroma clamp(2 - |hue - centre|, 0, 1) around its centre (red 0 or
    6, green 2, blue 4), written without a modulo per channel (see transforms.adjust_hue)."""
    if x.shape[0] == 1:
        return x
    r, g, b = x
    hi, lo, chroma, hue, t, mask = _scratch(work, "hue", (6, *x.shape[1:]), x.dtype)
    torch.maximum(torch.maximum(r, g, out=hi), b, out=hi)
    torch.minimum(torch.minimum(r, g, out=lo), b, out=lo)
    torch.sub(hi, lo, out=chroma)
    # Numerators of the three sectors' hues (times chroma); red's overrides green's, which overrides blue's.
    torch.sub(r, g, out=hue).add_(chroma, alpha=4)
    torch.sub(b, r, out=t).add_(chroma, alpha=2)
    torch.lerp(hue, t, torch.eq(g, hi, out=mask), out=hue)
    torch.sub(g, b, out=t)
    torch.lerp(hue, t, torch.eq(r, hi, out=mask), out=hue)
    hue.div_(torch.clamp(chroma, min=1e-30, out=t)).add_(6.0 * shift)  # in [-2.2, 6.2) for |shift| <= 0.2
    hue.sub_(torch.floor(torch.mul(hue, 1 / 6, out=t), out=t), alpha=6.0)  # to [0, 6] (6 only by rounding: same as 0)
    # r = clamp(min + chroma (|hue - 3| - 1)), g, b = clamp(max - chroma (|hue - c| - 1)), c = 2, 4, in [min, max].
    torch.addcmul(torch.sub(lo, chroma, out=mask), chroma, torch.sub(hue, 3.0, out=t).abs_(), out=r)
    r.clamp_(lo, hi)
    base = torch.add(hi, chroma, out=mask)
    for channel, centre in ((g, 2.0), (b, 4.0)):
        torch.addcmul(base, chroma, torch.sub(hue, centre, out=t).abs_(), value=-1, out=channel)
        channel.clamp_(lo, hi)
    return x


def blur_taps(kernel: int, sigma: Tensor) -> list[list[float]]:
    """Per sample, the taps of F.gaussian_blur's 1-d kernel (float32) for sigma (B,) whose
    weight is >= TAP_FLOOR: a symmetric list of 2 r + 1 <= kernel weights."""
    t = torch.arange(kernel, dtype=torch.float32) - kernel // 2
    weights = torch.softmax(-(t[None, :] / sigma.float()[:, None]) ** 2 / 2, dim=1).tolist()
    out = []
    for w in weights:
        r = kernel // 2
        while r and w[kernel // 2 + r] < TAP_FLOOR:
            r -= 1
        out.append(w[kernel // 2 - r : kernel // 2 + r + 1])
    return out


def band_matrix(taps: list[float], block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(block, block + 2 r): row i holds the taps at columns i .. i + 2 r, so that rows
    [i, i + block) of a 1-d convolution are this matrix times input rows [i, i + block + 2 r)."""
    k = len(taps)
    row = torch.tensor(taps + [0.0] * block, dtype=dtype)  # period block + k: the next row starts one further right
    return row.repeat(block)[: block * (block + k - 1)].view(block, block + k - 1)


def gaussian_blur_into(out: Tensor, x: Tensor, taps: list[float], *, scale: float = 1.0, shift: float = 0.0,
                       block: int = 16, work: Workspace | None = None) -> Tensor:
    """out = clamp(scale blur(x) + shift) per channel, F.gaussian_blur with 1-d kernel `taps`
    over reflect-padded edges (torchvision's padding). x: (C, H, W), H, W > len(taps) // 2;
    out: (C', H, W) with C' = C, or C = 1 for a grey image whose channel is copied to all C'.
    The clamp is to [shift, scale + shift], the blurred image's range.

    Separable, each pass a batched matrix product with the banded matrix of `band_matrix`
    over blocks of `block` outputs whose input windows are equally spaced views (nothing
    copied but the padding): ~(block + 2 r) / (2 r + 1) times the multiply-adds of a direct
    convolution, at GEMM speed, ~3x a depthwise conv's on a CPU. The padded image is laid
    out (H, C, W), so that the vertical windows of all channels are one stride apart."""
    c, h, w = x.shape
    r = len(taps) // 2
    if r == 0:
        y, target = x.mul(taps[0]), out
    else:
        bh, bw = _block(h, block), _block(w, block)
        nh, nw, wp = h // bh, w // bw, w + 2 * r
        padded = _scratch(work, "padded", (h + 2 * r, c, wp), x.dtype)
        _reflect_pad(x, r, padded.permute(1, 0, 2))
        # Vertical: rows [i bh, i bh + bh + 2r) of all channels, each window (bh + 2r, C (W + 2r)).
        windows = padded.view(h + 2 * r, c * wp).as_strided((nh, bh + 2 * r, c * wp), (bh * c * wp, c * wp, 1))
        kernel = band_matrix(taps, bh, x.dtype)
        rows = torch.bmm(kernel.expand(nh, *kernel.shape), windows,
                         out=_scratch(work, "rows", (nh, bh, c * wp), x.dtype))  # (H, C, W + 2r)
        # Horizontal: columns [j bw, j bw + bw + 2r) of every (row, channel), each window (H C, bw + 2r).
        windows = rows.view(h * c, wp).as_strided((nw, h * c, bw + 2 * r), (bw, wp, 1))
        kernel = band_matrix(taps, bw, x.dtype).t()
        y = torch.bmm(windows, kernel.expand(nw, *kernel.shape),
                      out=_scratch(work, "blurred", (nw, h * c, bw), x.dtype))
        y = y.view(nw, h, c, bw).permute(2, 1, 0, 3)  # (C, H, nw, bw): column j bw + k of row h
        target = out.view(out.shape[0], h, nw, bw)
    if c != out.shape[0]:
        y = y.expand(out.shape[0], *y.shape[1:])
    torch.add(torch.tensor(shift, dtype=out.dtype), y, alpha=scale, out=target)
    return out.clamp_(min(shift, scale + shift), max(shift, scale + shift))


def _reflect_pad(x: Tensor, r: int, out: Tensor) -> Tensor:
    """out (C, H + 2r, W + 2r) = F.pad(x, (r, r, r, r), mode="reflect"), into given memory."""
    _, h, w = x.shape
    out[:, r : r + h, r : r + w] = x
    out[:, r : r + h, :r] = x[:, :, 1 : r + 1].flip(-1)  # the edge itself is not repeated
    out[:, r : r + h, r + w :] = x[:, :, w - r - 1 : w - 1].flip(-1)
    out[:, :r] = out[:, r + 1 : 2 * r + 1].flip(-2)
    out[:, r + h :] = out[:, h - 1 : h + r - 1].flip(-2)
    return out


def _block(n: int, block: int) -> int:
    """The largest divisor of n not above `block` (blocks tile an axis exactly)."""
    return max(d for d in range(1, min(n, block) + 1) if n % d == 0)


def crop_into_(out: Tensor, image: Tensor, box: tuple[int, int, int, int], flip: bool) -> Tensor:
    """out = clamp((resized crop + 1) / 2, 0, 1) of an image in [-1, 1]: F.resized_crop(image,
    *box, out's size, antialias=True), then F.hflip if `flip`. image: (C, H_i, W_i); out:
    (C, S, S). Resampling weights sum to 1, so mapping to [0, 1] after the crop is the same."""
    top, left, h, w = box
    size = out.shape[-2:]
    crop = image[:, top : top + h, left : left + w]
    if (h, w) != tuple(size):  # else torchvision returns the crop itself
        crop = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        crop = crop.flip(-1)
    return torch.add(torch.tensor(0.5, dtype=out.dtype), crop, alpha=0.5, out=out).clamp_(0, 1)
