"""Augmentations, batched on the images' device, deterministic per (seed, step, sample).

Every pipeline transforms a whole batch at once with parameters drawn per sample for the
global batch of the step and picked by the samples' positions in it, so a sample gets the
same views whether 1 or W workers train and after a resume. Parameters are drawn on the
host (a few numbers per sample) and travel to the device in small copies; the pixels
never leave it. Pipelines by name:
- "none": identity; "flip": random horizontal flip (generation, as in the paper);
- "simclr": the SimCLR-v2 two-view pipeline of the paper, as the reference
  (lzn/data/imagenet_aug.py:28-38): RandomResizedCrop of the full-resolution image, flip,
  ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur always (p = 1,
  kernel int(0.1 size) made odd: 23 at 224, sigma uniform in [0.1, 2]), with torchvision's
  semantics (`SimCLRTwoView`; its batched ops in lzn.data.transforms, and on a CPU device
  image by image through lzn.data.image_ops). It takes images of any size
  and returns size x size, so a batch of mixed sizes stays a list and each is cropped from
  its full resolution (`crops_any_size`);
- "simclr_digits": its 8x8 single-channel variant: no flip (a mirrored 2 is not a 2),
  random zoom (crop), rotation and shift as one affine warp, contrast/brightness jitter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from lzn import seeds
from lzn.data import image_ops
from lzn.data.transforms import adjust_hue, blend_ops_, crop_boxes, gaussian_blur, grayscale, resized_crops
from lzn.errors import UserError


def blur_kernel(size: int) -> int:
    """The reference's blur kernel for `size` px crops: int(0.1 size) + 1 at 224 (= 23), in
    general int(0.1 size) rounded up to odd (a Gaussian kernel needs a centre)."""
    return int(0.1 * size) | 1


def batch_generator(seed: int, step: int, view: int) -> torch.Generator:
    """The host generator of the per-sample parameters of `view` of the global batch of `step`."""
    return torch.Generator().manual_seed(seeds.batch_augmentation(seed, step, view))


class BatchAugment:
    """A batched augmentation of images (B, C, H, W) in [-1, 1] on any device.

    Random parameters are drawn per sample for the global batch of `total` images from
    (seed, step, view) and picked by `positions` (B,) (host tensor), the samples' places in
    it. An augmentation that `crops_any_size` also takes a list of B images (C, H_i, W_i)
    of any sizes on one device, and returns one size."""

    crops_any_size = False

    def __call__(self, images: Images, *, seed: int, step: int, view: int, positions: Tensor,
                 total: int) -> Tensor:
        raise NotImplementedError


class HorizontalFlip(BatchAugment):
    """Mirror with p = 0.5. Sample at `position` is flipped exactly when torchvision's
    RandomHorizontalFlip flipped it under torch.manual_seed(seeds.augmentation(seed, step,
    position, view)), the per-sample pipeline this replaced: runs trained with it keep their
    stream of flips (a few microseconds of host work per sample)."""

    def flips(self, *, seed: int, step: int, view: int, positions: Tensor) -> Tensor:
        """(B,) bool on the host."""
        g, u = torch.Generator(), torch.empty(1)
        draws = []
        for p in positions.tolist():
            g.manual_seed(seeds.augmentation(seed, step, p, view))
            draws.append(float(u.uniform_(generator=g)))  # torch.rand(1) under that seed
        return torch.tensor(draws) < 0.5  # RandomHorizontalFlip: flip unless rand(1) >= p

    def __call__(self, images, *, seed, step, view, positions, total):
        flip = self.flips(seed=seed, step=step, view=view, positions=positions)
        flip = flip.to(images.device, non_blocking=True).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)


class DigitsTwoView(BatchAugment):
    """Zoom in [1, 1/0.6] (a crop of 60-100% of the side), rotation within +-15 degrees,
    shift within +-1 pixel, then with p = 0.8 brightness +-0.4 and contrast x[0.6, 1.4]."""

    def __call__(self, images, *, seed, step, view, positions, total):
        generator = batch_generator(seed, step, view)

        def draw(*shape):
            return torch.rand(total, *shape, generator=generator)[positions].to(images.device)

        zoom = 0.6 + 0.4 * draw()  # sampling grid scale < 1 zooms in
        angle = (draw() * 2 - 1) * math.radians(15)
        shift = (draw(2) * 2 - 1) * (2.0 / images.shape[-1])
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        # Background is -1 (white paper in [-1, 1] digits is -1): warp (x + 1), pad with 0.
        out = nn.functional.grid_sample(images + 1, grid, padding_mode="zeros", align_corners=False) - 1
        jitter = (draw() < 0.8).to(images.dtype).view(-1, 1, 1, 1)
        bright = ((draw() * 2 - 1) * 0.4).view(-1, 1, 1, 1)
        contrast = (0.6 + 0.8 * draw()).view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        jittered = (out - mean) * contrast + mean + bright
        return (jitter * jittered + (1 - jitter) * out).clamp(-1, 1)


@dataclass(frozen=True)
class SimCLRParams:
    """Per-sample parameters of one SimCLR view of B samples (host tensors)."""

    boxes: Tensor  # (B, 4) int64 crop (top, left, height, width) in the full-resolution image
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: colour jitter applied
    order: Tensor  # (B, 4) int64: the jitter's ops in the order applied (0 brightness, 1 contrast, 2 saturation, 3 hue)
    factors: Tensor  # (B, 4) float: brightness, contrast, saturation factors in [0.2, 1.8], hue shift in [-0.2, 0.2]
    gray: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float: the blur's sigma in [0.1, 2]


class SimCLRTwoView(BatchAugment):
    """torchvision's v2.Compose([RandomResizedCrop(size, antialias=True), RandomHorizontalFlip(),
    RandomApply([ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), RandomGrayscale(0.2),
    GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))]) on [0, 1] images, batched: the same
    distributions of parameters, the same transform given them (lzn.data.transforms)."""

    crops_any_size = True
    SCALE, RATIO, TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10
    P_FLIP, P_JITTER, P_GRAY = 0.5, 0.8, 0.2
    JITTER = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation: factor in [1 - j, 1 + j]; hue: [-j, j]
    SIGMA = (0.1, 2.0)
    # On a CPU device the views are made image by image (lzn.data.image_ops: cache-resident,
    # nothing computed for a coin that says no); elsewhere the whole batch at once.
    PER_IMAGE_ON_CPU = True

    def __init__(self, size: int):
        self.size, self.kernel = size, blur_kernel(size)

    def params(self, sizes: Tensor, *, seed: int, step: int, view: int, positions: Tensor,
               total: int) -> SimCLRParams:
        """The parameters of the samples at `positions` (B,) whose images are (H_i, W_i) = sizes (B, 2)."""
        t = self.TRIES
        # One fixed layout of uniforms per sample of the global batch, whatever the sizes.
        u = torch.rand(total, 2 * t + 14, generator=batch_generator(seed, step, view), dtype=torch.float64)[positions]
        boxes = crop_boxes(sizes[:, 0], sizes[:, 1], u[:, :t], u[:, t : 2 * t], u[:, 2 * t], u[:, 2 * t + 1],
                           scale=self.SCALE, ratio=self.RATIO)
        u = u[:, 2 * t + 2 :]
        lo = torch.tensor([max(0.0, 1 - j) for j in self.JITTER[:3]] + [-self.JITTER[3]], dtype=torch.float64)
        hi = torch.tensor([1 + j for j in self.JITTER[:3]] + [self.JITTER[3]], dtype=torch.float64)
        return SimCLRParams(
            boxes=boxes, flip=u[:, 0] < self.P_FLIP, jitter=u[:, 1] < self.P_JITTER,
            order=u[:, 2:6].argsort(1),  # the ranks of 4 iid uniforms: a uniform permutation
            factors=(lo + (hi - lo) * u[:, 6:10]).float(), gray=u[:, 10] < self.P_GRAY,
            sigma=(self.SIGMA[0] + (self.SIGMA[1] - self.SIGMA[0]) * u[:, 11]).float())

    def apply(self, images: Images, p: SimCLRParams) -> Tensor:
        """(B, C, size, size) in [-1, 1] of images in [-1, 1]: (B, C, H, W) or B images
        (C, H_i, W_i), each cropped within its box."""
        device = (images if isinstance(images, Tensor) else images[0]).device
        if device.type == "cpu" and self.PER_IMAGE_ON_CPU:
            return self._views_per_image(images, p)
        order = torch.where(p.jitter[:, None], p.order, -1)  # -1: no jitter
        floats = torch.cat([p.factors, p.sigma[:, None]], 1).to(device, non_blocking=True)
        return self._view(images, p, order, order.to(device, non_blocking=True), floats)

    def _views_per_image(self, images: Images, p: SimCLRParams) -> Tensor:
        """`apply` on a CPU: each view through one reused (C, size, size) buffer, the jitter's
        ops in the sample's order only where its coin says so, grayscale blurred as one plane."""
        first = images[0]
        out = torch.empty((len(images), first.shape[0], self.size, self.size), dtype=first.dtype)
        x = torch.empty(out.shape[1:], dtype=first.dtype)
        work = image_ops.Workspace(first.dtype)
        ops = (image_ops.brightness_, image_ops.contrast_, image_ops.saturation_, image_ops.hue_)
        rows = zip(images, p.boxes.tolist(), p.flip.tolist(), p.jitter.tolist(), p.order.tolist(),
                   p.factors.tolist(), p.gray.tolist(), image_ops.blur_taps(self.kernel, p.sigma))
        for slot, (image, box, flip, jitter, order, factors, gray, taps) in zip(out, rows):
            image_ops.crop_into_(x, image, box, flip)
            if jitter:
                for op in order:
                    ops[op](x, factors[op], work)
            y = image_ops.gray_plane(x, work) if gray and x.shape[0] == 3 else x
            image_ops.gaussian_blur_into(slot, y, taps, scale=2.0, shift=-1.0, work=work)  # to [-1, 1]
        return out

    def _view(self, images: Images, p: SimCLRParams, order: Tensor, ints: Tensor, floats: Tensor) -> Tensor:
        """`apply` of a whole batch at once; order: (B, 4) host, -1 without jitter; ints, floats: on the device."""
        x = resized_crops(images, p.boxes, self.size, p.flip)
        device, channels = x.device, x.shape[1]
        # Resampling weights sum to 1, so [-1, 1] -> [0, 1] (what colour ops assume) commutes with the crop.
        x = x.mul_(0.5).add_(0.5).clamp_(0, 1)
        # ColorJitter in each sample's order: slot k applies each sample's k-th op; the three
        # blends run on all samples in one pass, hue on its rows only (indices from the host
        # parameters: no device sync).
        for slot in range(4):
            op = ints[:, slot]
            blend_ops_(x, op, floats[:, :3].gather(1, op.clamp(0, 2)[:, None])[:, 0])
            rows = (order[:, slot] == 3).nonzero()[:, 0]
            if len(rows) and channels == 3:
                rows = rows.to(device, non_blocking=True)
                x[rows] = adjust_hue(x[rows], floats[rows, 3])
        rows = p.gray.nonzero()[:, 0]
        if len(rows) and channels == 3:
            rows = rows.to(device, non_blocking=True)
            x[rows] = grayscale(x[rows]).expand(-1, channels, -1, -1)
        x = gaussian_blur(x, self.kernel, floats[:, 4])
        return x.mul_(2).sub_(1).clamp_(-1, 1)

    def __call__(self, images, *, seed, step, view, positions, total):
        sizes = (torch.tensor(images.shape[-2:]).expand(len(images), 2) if isinstance(images, Tensor)
                 else torch.tensor([tuple(x.shape[-2:]) for x in images]))
        return self.apply(images, self.params(sizes, seed=seed, step=step, view=view, positions=positions,
                                              total=total))


PIPELINES: dict[str, Callable[[int], BatchAugment | None]] = {
    "none": lambda size: None,
    "flip": lambda size: HorizontalFlip(),
    "simclr": SimCLRTwoView,
    "simclr_digits": lambda size: DigitsTwoView(),
}


# Pipelines whose output is image_size x image_size whatever the input's size: they get the
# images at full resolution (the stream does not square them first) and crop per sample.
CROPS_ANY_SIZE = frozenset({"simclr"})


def crops_any_size(name: str) -> bool:
    """Whether pipeline `name` turns an image of any size into image_size x image_size."""
    if name not in PIPELINES:
        raise UserError(f"unknown augmentation {name!r}; expected one of {sorted(PIPELINES)}")
    return name in CROPS_ANY_SIZE


def build_augment(name: str, image_size: int) -> BatchAugment | None:
    if name not in PIPELINES:
        raise UserError(f"unknown augmentation {name!r}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name](image_size)


Images = Tensor | Sequence[Tensor]  # (B, C, H, W), or B images (C, H_i, W_i) of any sizes


def stack_images(images: Images, why: str) -> Tensor:
    """(B, C, H, W) of a batch whose images share one size; a clear error naming the sizes otherwise."""
    if isinstance(images, Tensor):
        return images
    sizes = sorted({tuple(x.shape) for x in images})
    if len(sizes) > 1:
        raise ValueError(f"a batch of images of sizes {sizes[:4]}{' ...' if len(sizes) > 4 else ''} cannot be "
                         f"stacked {why}; mixed sizes need a cropping augmentation ({sorted(CROPS_ANY_SIZE)}) "
                         "or images squared by the reader")
    return torch.stack(list(images))


def augment_batch(transform: BatchAugment | None, images: Images, *, seed: int, step: int, positions: Tensor,
                  total: int, view: int = 0) -> Tensor:
    """`transform` of images in [-1, 1], each with its own parameters; returns (B, C, S, S).

    images: (B, C, H, W) on any device, or a list of B images (C, H_i, W_i) on one device, at
    full resolution for an augmentation that crops (`crops_any_size`); any other refuses
    mixed sizes. positions: (B,) host positions of the images in the global batch of
    `total` images.
    """
    if not isinstance(images, Tensor) and not (transform is not None and transform.crops_any_size):
        images = stack_images(images, f"for {type(transform).__name__}" if transform else "without augmentation")
    if transform is None:
        return images
    return transform(images, seed=seed, step=step, view=view, positions=positions, total=total)
