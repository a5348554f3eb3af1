"""Improved precision and recall (Kynkäänniemi et al., 2019) of a generated feature set.

Each set's manifold is the union of balls around its samples, the radius of a ball being
the distance to the sample's k-th nearest neighbour in its own set (k = 3). Precision: the
fraction of generated samples inside the real manifold; recall: the fraction of real
samples inside the generated one (distance <= radius counts as inside, as torch-fidelity's
`calculate_precision_recall_part`). Distances are computed `batch_size` rows at a time, so
memory is O(batch_size x N) rather than O(N^2).
"""
from __future__ import annotations

import torch
from torch import Tensor

PR_NEIGHBOURHOOD = 3  # torch-fidelity's prc_neighborhood
PR_BATCH = 4096


def knn_radii(features: Tensor, k: int = PR_NEIGHBOURHOOD, *, batch_size: int = PR_BATCH) -> Tensor:
    """(N,) distance of each row of `features` (N, d) to its k-th nearest other row."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {len(features)}")
    # The (k + 1)-th smallest distance: the smallest is the row itself (0).
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values
                      for chunk in features.split(batch_size)])


def _inside(queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """Fraction of `queries` within radii[j] of some centres[j]."""
    hits = [(torch.cdist(chunk, centres) <= radii[None]).any(dim=1) for chunk in queries.split(batch_size)]
    return torch.cat(hits).double().mean()


def precision_recall(real: Tensor, fake: Tensor, *, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = PR_BATCH) -> tuple[float, float]:
    """(precision, recall) of generated features fake (N_f, d) against real features (N_r, d)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall need features (N, d) of one width, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fake = fake.to(real.device, real.dtype)
    precision = _inside(fake, real, knn_radii(real, k, batch_size=batch_size), batch_size)
    recall = _inside(real, fake, knn_radii(fake, k, batch_size=batch_size), batch_size)
    return float(precision), float(recall)
