"""What the prepare stage does to an image when the task asks for another size or mode.

An image is converted to the task's channels (PIL's conversion: 'L' is ITU-R 601-2 luma,
palettes and alpha are resolved by PIL; grey to RGB repeats the channel), then, unless it
already has the task's size, resized with torchvision (shorter side to `size`, bilinear,
antialiased) and centre-cropped to size x size: torchvision's Resize(size) + CenterCrop(size),
the evaluation transform of the image-classification literature.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Union

import numpy as np

from lzn.errors import UserError

METHOD = ("torchvision.transforms.v2.functional: resize(shorter side to size, bilinear, antialias=True) "
          "then center_crop(size); channels by PIL convert('L' or 'RGB')")


@dataclass(frozen=True)
class Target:
    """The square images a task's model sees: size x size x channels (1 or 3)."""
    size: int
    channels: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.channels not in (1, 3):
            raise UserError(f"images can be prepared as size >= 1 with 1 or 3 channels, got size={self.size}, "
                            f"channels={self.channels}")

    @property
    def shape(self) -> str:
        return f"{self.size}x{self.size}x{self.channels}"


def _to_mode(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, c) uint8 -> (H, W, channels) through PIL's conversion."""
    from PIL import Image

    if pixels.shape[2] == channels:
        return pixels
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    return np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(*pixels.shape[:2], channels)


def decode_as(data: Union[bytes, np.ndarray], channels: int) -> np.ndarray:
    """File bytes (any format PIL reads, fully decoded) or pixels (H, W[, C]) -> (H, W, channels) uint8."""
    if isinstance(data, np.ndarray):
        pixels = data if data.ndim == 3 else data[:, :, None]
        if pixels.dtype != np.uint8 or pixels.shape[2] not in (1, 3):
            raise ValueError(f"pixels must be uint8 (H, W, 1 or 3), got {pixels.dtype} {pixels.shape}")
        return _to_mode(pixels, channels)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # a full decode: truncated files fail here
        return np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(img.height, img.width, channels)


def square(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C): unchanged when already that size, else the shorter
    side resized to `size` (bilinear, antialiased) and the centre size x size kept."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    if pixels.shape[:2] == (size, size):
        return pixels
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # a writable copy
    x = TF.center_crop(TF.resize(x, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True),
                       [size, size])
    return x.permute(1, 2, 0).contiguous().numpy()


def prepared_pixels(data: Union[bytes, np.ndarray], target: Target) -> np.ndarray:
    """An image as the task sees it: (size, size, channels) uint8."""
    return square(decode_as(data, target.channels), target.size)


def source_shape(ref) -> str | None:
    """'HxWxC' of an item as stored (an array, or a file PIL reads the header of); None when
    it does not open (the prepare stage rejects it, with the reason, when it decodes it)."""
    from PIL import Image

    if isinstance(ref, np.ndarray):
        h, w, *c = ref.shape
        return f"{h}x{w}x{c[0] if c else 1}"
    try:
        source = getattr(ref, "path", None)
        if source is None:  # a member of an archive: its bytes
            with open(ref.archive, "rb") as f:
                f.seek(ref.offset)
                source = io.BytesIO(f.read(ref.size))
        with Image.open(source) as img:
            return f"{img.height}x{img.width}x{len(img.getbands())}"
    except Exception:  # noqa: BLE001 - any failure to open is reported by the decode
        return None
