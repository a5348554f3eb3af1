"""A folder of images as a user has them: two classes, mixed sizes (some over 2x a 16 px
target, some not square) and modes (RGB, grey, palette, RGBA), no split folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# (height, width, PIL mode) cycled over the images of each class
SHAPES = ((20, 20, "RGB"), (25, 25, "L"), (24, 30, "RGB"), (40, 40, "RGB"), (48, 36, "L"), (18, 18, "P"),
          (33, 33, "RGBA"))


def _picture(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: a bright disc (label 0) or square (label 1) on a dark ground."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6), min(h, w) * rng.uniform(0.2, 0.3)
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if label == 0 else (
        (abs(yy - cy) < r) & (abs(xx - cx) < r))
    colour = rng.integers(150, 256, 3)
    image = rng.integers(0, 40, (h, w, 3))
    image[inside] = colour
    return image.astype(np.uint8)


def mixed_folder(root: Path, per_class: int = 20, seed: int = 0) -> dict[str, tuple[int, int, str]]:
    """Write root/<disc|square>/<i>.png; returns {path: (height, width, mode)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for label, name in enumerate(("disc", "square")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w, mode = SHAPES[i % len(SHAPES)]
            img = Image.fromarray(_picture(rng, label, h, w))
            img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE)
            path = root / name / f"{i:03d}.png"
            img.save(path)
            written[str(path)] = (h, w, mode)
    return written
