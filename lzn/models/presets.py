"""`model.encoder=auto` / `model.decoder=auto`: the model preset sized from the image size.

The generic tasks (`gen_images`, `repr_images`, `joint_images`) train any folder at any
`data.image_size`; this picks the networks the paper and its reference use at that size,
and a tiny one that trains on a CPU up to 32 px:

| image_size | generation / joint: encoder + decoder | representation: encoder |
| --- | --- | --- |
| 8-32, multiples of 4 | `ncsnpp_tiny` + `unet_tiny` (3 levels, 1 block; CPU) | `ncsnpp_tiny` |
| 40-64, multiples of 8 | `ncsnpp_cifar10` + `ddpmpp_cifar10` (the paper's CIFAR10 networks; score_sde's 64 px CelebA NCSN++ has the same levels) | `resnet50_gn` (the paper's CS2) |
| 96, 128 | `ncsnpp_128` + `ncsnpp_128` (the 256 px networks' widths per resolution, one level fewer) | `resnet50_gn` |
| 192, 256 | `ncsnpp_256` + `ncsnpp_256` (the paper's 256 px networks) | `resnet50_gn` |

Each U-Net level halves the image, so a size must be a multiple of 2^(levels - 1); sizes
are also what the attention and the encoder's latent heads are placed by: attention at
S/4 (tiny, <= 64 px), S/8 (128 px), S/16 (256 px), as 16 is at the paper's sizes; latent heads
on every map below the full resolution (tiny, 64 px) or from S/2 (128) and S/4 (256) down to 4,
as the paper's 256 px encoder has them at 64..4. Any other size is refused with the valid ones.
`model.encoder_overrides` / `decoder_overrides` apply on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lzn.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class SizedPreset:
    encoder: str
    decoder: str | None  # None: the representation case study has no decoder
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    decoder_overrides: dict[str, Any] = field(default_factory=dict)


# (largest size, multiple of, generation encoder, decoder, representation encoder)
_BANDS = (
    (32, 4, "ncsnpp_tiny", "unet_tiny", "ncsnpp_tiny"),
    (64, 8, "ncsnpp_cifar10", "ddpmpp_cifar10", "resnet50_gn"),
    (128, 32, "ncsnpp_128", "ncsnpp_128", "resnet50_gn"),
    (256, 64, "ncsnpp_256", "ncsnpp_256", "resnet50_gn"),
)
MIN_SIZE = 8


def valid_sizes() -> list[int]:
    sizes, low = [], MIN_SIZE
    for top, step, *_ in _BANDS:
        sizes += [s for s in range(low, top + 1) if s % step == 0]
        low = top + 1
    return sizes


def _halvings(size: int, lowest: int) -> tuple[int, ...]:
    """size/2, size/4, ... down to `lowest`."""
    out, res = [], size // 2
    while res >= lowest:
        out.append(res)
        res //= 2
    return tuple(out)


def preset_for(image_size: int, *, decoder: bool = True) -> SizedPreset:
    """The networks for square images of `image_size` (decoder=False: the representation encoder)."""
    band = next((b for b in _BANDS if MIN_SIZE <= image_size <= b[0] and image_size % b[1] == 0), None)
    if band is None:
        sizes = valid_sizes()
        near = sorted(sizes, key=lambda s: (abs(s - image_size), s))[:2]
        raise UserError(
            f"data.image_size={image_size} has no model preset (model.encoder/decoder=auto): each U-Net level "
            f"halves the image, so the sizes are 8-32 in steps of 4, 40-64 in steps of 8, 96, 128, 192 and 256. "
            f"Nearest: {' or '.join(map(str, sorted(near)))} (the prepare stage resizes your images to it), "
            f"or name a preset with model.encoder= and model.decoder=")
    top, _, gen_encoder, gen_decoder, repr_encoder = band
    s = image_size
    if not decoder:
        if repr_encoder == "ncsnpp_tiny":
            return SizedPreset(repr_encoder, None, {"head_resolutions": _halvings(s, 2)})
        return SizedPreset(repr_encoder, None)
    if top <= 64:
        attn, heads = (s // 4,), _halvings(s, 2)
    elif top == 128:
        attn, heads = (s // 8,), _halvings(s, 4)
    else:
        attn, heads = (s // 16,), _halvings(s // 2, 4)
    return SizedPreset(gen_encoder, gen_decoder, {"head_resolutions": heads, "attn_resolutions": attn},
                       {"attn_resolutions": attn})
