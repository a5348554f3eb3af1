"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes) as image tensors.

The split is the one every digits task, metric and report uses: a stratified 70/30
train/test split with a fixed seed. Pixels (0..16) are scaled to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # (n_train, 1, 8, 8) float32 in [-1, 1]
    train_labels: torch.Tensor  # (n_train,) int64
    test_images: torch.Tensor  # (n_test, 1, 8, 8)
    test_labels: torch.Tensor  # (n_test,)


def digits_split(seed: int = DIGITS_SPLIT_SEED) -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=DIGITS_TEST_FRACTION, stratify=data.target, random_state=seed
    )

    def take(idx):
        return (torch.from_numpy(images[idx]).unsqueeze(1).contiguous(),
                torch.from_numpy(data.target[idx].astype(np.int64)))

    return DigitsSplit(*take(idx_train), *take(idx_test))
