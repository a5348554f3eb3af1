"""Kernel Inception Distance (Bińkowski et al., 2018): an unbiased MMD^2 between feature sets.

As torch-fidelity (`kid_features_to_metric`, itself from the MMD-GAN code): the cubic
polynomial kernel k(x, y) = (x . y / d + 1)^3; `subsets` times, draw `subset_size` rows of
each set without replacement (`np.random.RandomState(seed).choice`, generated set first)
and take the unbiased estimate
    MMD^2 = (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2;
report the mean and (population) std over subsets. Here in float64 on the features' device
(torch-fidelity works in float32 numpy), so memory is O(subset_size^2) whatever N.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KID_SUBSETS = 100  # torch-fidelity's kid_subsets
KID_SUBSET_SIZE = 1000  # torch-fidelity's kid_subset_size
KID_SEED = 2020


def polynomial_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of feature sets x (m, d) and y (m, d) under (x . y / d + 1)^3; a scalar."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(real: Tensor, fake: Tensor, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """(mean, std) KID between features real (N_r, d) and fake (N_f, d)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID needs features (N, d) of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if subset_size > min(len(real), len(fake)):
        raise ValueError(f"KID subset_size={subset_size} exceeds the samples available "
                         f"(real {len(real)}, fake {len(fake)})")
    rng = np.random.RandomState(seed)
    real, fake = real.double(), fake.double()
    mmds = []
    for _ in range(subsets):
        f = fake[torch.from_numpy(rng.choice(len(fake), subset_size, replace=False)).to(fake.device)]
        r = real[torch.from_numpy(rng.choice(len(real), subset_size, replace=False)).to(real.device)]
        mmds.append(polynomial_mmd2(f, r))
    mmds = torch.stack(mmds).cpu()
    return float(mmds.mean()), float(mmds.std(unbiased=False))
