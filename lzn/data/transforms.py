"""Batched image transforms with per-sample parameters, on the images' device.

Each is torchvision.transforms.v2.functional's transform of the same name applied to every
sample with that sample's parameter, written for a whole batch: images (B, C, H, W) float
in [0, 1] (C = 1 or 3), parameters (B, ...) on the same device (`resized_crops` takes its
boxes on the host). No function reads a device value back to the host. lzn.data.augment
composes them into the SimCLR pipeline.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def crop_boxes(heights: Tensor, widths: Tensor, u_scale: Tensor, u_ratio: Tensor, u_top: Tensor, u_left: Tensor, *,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """RandomResizedCrop's boxes, all tries at once: (B, 4) int64 (top, left, height, width).

    heights, widths: (B,) image sizes; u_scale, u_ratio: (B, T) uniforms in [0, 1) for T tries
    of (area share in `scale`, log-uniform aspect ratio in `ratio`); u_top, u_left: (B,) for
    the offsets. As torchvision: the first try whose rounded box fits is taken, its corner
    uniform over the positions that fit; when none fits, the centre crop of the whole image
    clamped to `ratio`. Host or device; float64 so the rounding is Python's (half to even).
    """
    h_img, w_img = heights.double()[:, None], widths.double()[:, None]
    target = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u_scale.double())
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio.double())
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    top = torch.floor(u_top.double() * (h_img - h + 1))
    left = torch.floor(u_left.double() * (w_img - w + 1))
    # Fallback: the whole image, clamped to the extreme ratio it violates, centred.
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    ftop, fleft = torch.div(h_img - fh, 2, rounding_mode="floor"), torch.div(w_img - fw, 2, rounding_mode="floor")
    box = torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                       torch.where(found, h, fh), torch.where(found, w, fw)], 1)
    return box.long()


def resize_weights(start: Tensor, length: Tensor, size: int, extent: int) -> Tensor:
    """(B, size, extent) float32: row i holds output pixel i of resizing [start, start + length)
    of an axis of `extent` pixels to `size`, as torch's interpolate(mode="bilinear",
    align_corners=False, antialias=True), which torchvision's resize calls.

    That is a triangle filter centred at scale (i + 0.5) in crop coordinates (scale = length /
    size), widened by `scale` when downscaling (so antialiased; upscaling is plain bilinear),
    its taps clipped to the crop and renormalised. Pixels outside the crop get weight 0.
    """
    device = start.device
    scale = (length.float() / size)[:, None, None]
    center = scale * (torch.arange(size, device=device, dtype=torch.float32)[None, :, None] + 0.5)
    support = scale.clamp(min=1.0)
    t = torch.arange(extent, device=device, dtype=torch.float32)[None, None, :] - start.float()[:, None, None]
    w = (1 - ((t - center + 0.5) / support).abs()).clamp_(min=0)
    w = w * ((t >= 0) & (t < length.float()[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def resized_crops(images: Tensor | Sequence[Tensor], boxes: Tensor, size: int, flip: Tensor | None = None, *,
                  batched: bool | None = None) -> Tensor:
    """(B, C, size, size): F.resized_crop(image, top, left, height, width, [size, size],
    antialias=True) of each full-resolution image, then F.hflip where `flip` (B,) bool.

    images: (B, C, H, W), or B images (C, H_i, W_i) of any sizes (never padded: one large
    image would inflate the whole batch); boxes: (B, 4) int64 (top, left, height, width),
    host. Two routes to torchvision's antialiased resize (a triangle filter, see
    `resize_weights`), the same numbers to ~1e-6: on an accelerator, one batched GEMM per
    axis (out = Wy @ image @ Wx^T) on a (B, C, H, W) tensor, two kernels for the batch; on
    the CPU, and for images of mixed sizes (a kernel each on a GPU), torch's own separable
    kernel per crop (a view: nothing copied but the crop). That needs ~10 multiply-adds per
    output pixel where the GEMM needs ~H + H W / size (~800 from 300 x 400 to 224): ~13x
    the time on a CPU core, well under a millisecond on a GPU. Not roi_align or
    grid_sample: their bilinear taps (or roi_align's box average of them) are not that
    triangle filter, so large crops would alias or blur differently from torchvision's.
    `batched` forces a route (tests).
    """
    on_device = isinstance(images, Tensor) and images.device.type != "cpu"
    if batched if batched is not None else on_device:
        return _resized_crops_gemm(images, boxes.to(images.device, non_blocking=True), size,
                                   None if flip is None else flip.to(images.device, non_blocking=True))
    first = images[0]
    out = torch.empty((len(images), first.shape[0], size, size), dtype=first.dtype, device=first.device)
    flips = [False] * len(images) if flip is None else flip.tolist()
    for slot, image, (top, left, h, w), mirror in zip(out, images, boxes.tolist(), flips):
        crop = image[:, top : top + h, left : left + w]
        if (h, w) != (size, size):  # else torchvision returns the crop itself
            crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        slot.copy_(crop.flip(-1) if mirror else crop)
    return out


def _resized_crops_gemm(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None) -> Tensor:
    """`resized_crops` as two batched GEMMs; boxes, flip on the images' device. Under TF32
    the taps keep ~3 decimal digits, below the 1/255 of the stored pixels."""
    _, _, height, width = images.shape
    wy = resize_weights(boxes[:, 0], boxes[:, 2], size, height)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], size, width)
    if flip is not None:
        wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    wy, wx = wy.to(images.dtype), wx.to(images.dtype)
    if width >= height:  # contract the longer axis first: the second GEMM is then the smaller
        return torch.einsum("bth,bchs->bcts", wy, torch.einsum("bchw,bsw->bchs", images, wx))
    return torch.einsum("bctw,bsw->bcts", torch.einsum("bth,bchw->bctw", wy, images), wx)


def grayscale(images: Tensor) -> Tensor:
    """(B, 1, H, W) luma (F.rgb_to_grayscale); a 1-channel image is its own."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def blend_ops_(images: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_brightness (op 0), adjust_contrast (1) or adjust_saturation (2) of each image
    by its `factor`, in place and in one pass: each blends the image with 0, the mean of its
    grayscale, or its grayscale (factor x + (1 - factor) target, clamped to [0, 1]). Samples
    with any other op (and saturation of 1-channel images, as torchvision) are left as they
    are. images: (B, C, H, W); op, factor: (B,)."""
    gray = grayscale(images)
    op, f = op.view(-1, 1, 1, 1), factor.view(-1, 1, 1, 1).to(images.dtype)
    blends = (op == 0) | (op == 1) | ((op == 2) & (images.shape[1] == 3))
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # before `images` (gray itself if C = 1) changes
    offset = torch.where(op == 1, (1 - f) * mean, 0.0)
    images.mul_(torch.where(blends, f, 1.0)).add_(offset)
    if images.shape[1] == 3:
        images.addcmul_(gray, torch.where(op == 2, 1 - f, 0.0))
    return images.clamp_(0, 1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """F.adjust_hue per sample: rotate the hue in HSV by shift (B,) in [-0.5, 0.5] turns.
    images: (B, 3, H, W) in [0, 1]; 1-channel images have no hue and are returned as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # Hue in sixths of a turn, from the sector of the largest channel (as torchvision's
    # _rgb_to_hsv: red first, then green; a grey pixel gets 0), shifted and wrapped to [0, 6).
    is_r, is_g = maxc == r, maxc == g
    sector = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4)))
    hue = sector.div_(chroma.clamp(min=1e-30)).add_(6 * shift.view(-1, 1, 1).to(images.dtype)).remainder_(6.0)
    # Back to RGB keeping value (max) and chroma (value x saturation). HSV -> RGB gives
    # channel n (5, 3, 1 for r, g, b) max - chroma clamp(min(k, 4 - k), 0, 1), k = (n + hue)
    # mod 6; over hue in [0, 6) that is, without a modulo, r = min + chroma (|hue - 3| - 1),
    # g = max - chroma (|hue - 2| - 1), b = max - chroma (|hue - 4| - 1), each clamped to [min, max].
    out = torch.empty_like(images)
    for channel, centre, base, sign in ((0, 3.0, minc - chroma, 1.0), (1, 2.0, maxc + chroma, -1.0),
                                        (2, 4.0, maxc + chroma, -1.0)):
        torch.clamp(torch.addcmul(base, chroma, (hue - centre).abs_(), value=sign), minc, maxc, out=out[:, channel])
    return out


def gaussian_blur(images: Tensor, kernel: int, sigma: Tensor) -> Tensor:
    """F.gaussian_blur(image, [kernel, kernel], [s, s]) per sample with s = sigma (B,): a
    separable Gaussian over reflect-padded edges (torchvision's padding).
    images: (B, C, H, W) with H, W > kernel // 2; kernel odd."""
    if kernel == 1:
        return images
    b, c, h, w = images.shape
    r = kernel // 2
    taps = torch.arange(kernel, device=images.device, dtype=images.dtype) - r
    weights = torch.softmax(-(taps[None, :] / sigma.to(images.dtype)[:, None]) ** 2 / 2, dim=1)  # (B, kernel)
    weights = weights.repeat_interleave(c, 0)
    # Every (sample, channel) its own group; channels-last (taken before padding, which keeps
    # it) runs this depthwise conv ~2x faster on a CPU.
    x = images.reshape(1, b * c, h, w).contiguous(memory_format=torch.channels_last)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, weights.view(b * c, 1, 1, kernel), groups=b * c)
    x = F.conv2d(x, weights.view(b * c, 1, kernel, 1), groups=b * c)
    return x.reshape(b, c, h, w)
