"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes) as image tensors.

The split is the one every digits task, metric and report uses: a stratified 70/30
train/test split with a fixed seed. Pixels (0..16) are scaled to [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch

from lzn.data.reader import ImageSplit

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


def digits_raw_split(seed: int = DIGITS_SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train", "test"} -> (pixels (n, 8, 8) uint8 in 0..16, labels (n,), index into load_digits (n,))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(data.images)), test_size=DIGITS_TEST_FRACTION, stratify=data.target, random_state=seed
    )
    pixels = data.images.astype(np.uint8)
    return {split: (pixels[idx], data.target[idx].astype(np.int64), idx)
            for split, idx in (("train", idx_train), ("test", idx_test))}


def digits_split(seed: int = DIGITS_SPLIT_SEED) -> ImageSplit:
    """The split in memory, without shards (metrics and tests; the tasks read the shards)."""
    raw = digits_raw_split(seed)

    def take(split):
        pixels, labels, _ = raw[split]
        return torch.from_numpy(pixels.astype(np.float32) / 8.0 - 1.0).unsqueeze(1).contiguous(), torch.from_numpy(labels)

    return ImageSplit(*take("train"), *take("test"))
