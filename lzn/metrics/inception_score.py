"""Inception Score (Salimans et al., 2016) of an image set, from class logits, in mergeable parts.

IS = exp(E_x KL(p(y|x) || p(y))), computed as torch-fidelity does (`isc_features_to_metric`):
the N samples are shuffled by `np.random.RandomState(seed).permutation(N)`, cut into
`splits` contiguous groups, the score is computed per group with p(y) the group's mean
softmax, and the mean and (population) std over groups are reported.

Per group g the score needs only the count n_g, S_g = sum_i p_i (K,) and
E_g = sum_i sum_k p_ik log p_ik: KL_g = E_g / n_g - sum_k q_k log q_k with q = S_g / n_g.
So each evaluation shard adds its samples to the groups they fall in (`score_sums`, which
needs their global indices) and `ScoreSums.merge` adds shards: the score of N samples does
not depend on how many workers computed them, and equals torch-fidelity's on the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IS_SPLITS = 10  # torch-fidelity's isc_splits
IS_SEED = 2020  # torch-fidelity's rng_seed


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"the Inception Score needs class logits (N, K) with K >= 2, got shape {tuple(logits.shape)}")


def score_groups(indices: Tensor, total: int, splits: int = IS_SPLITS, seed: int = IS_SEED) -> Tensor:
    """The group (0..splits-1) of each sample of global index `indices` (n,) in a set of `total`."""
    if not 1 <= splits <= total:
        raise ValueError(f"the Inception Score needs 1 <= splits <= number of samples, got splits={splits} "
                         f"for {total} samples")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= total):
        raise ValueError(f"sample indices must lie in [0, {total}), got [{int(indices.min())}, {int(indices.max())}]")
    position = np.empty(total, dtype=np.int64)
    position[np.random.RandomState(seed).permutation(total)] = np.arange(total)  # where each sample lands
    starts = np.array([g * total // splits for g in range(splits)])
    return torch.from_numpy(np.searchsorted(starts, position[indices.numpy()], side="right") - 1)


@dataclass(frozen=True)
class ScoreSums:
    """Per group: count (G,), sum of softmax probabilities (G, K), sum of p log p (G,); float64, CPU."""

    count: Tensor
    prob_sum: Tensor
    plogp_sum: Tensor

    def merge(self, other: "ScoreSums") -> "ScoreSums":
        if other.prob_sum.shape != self.prob_sum.shape:
            raise ValueError(f"cannot merge Inception Score sums of shapes {tuple(self.prob_sum.shape)} and "
                             f"{tuple(other.prob_sum.shape)} (different splits or classes)")
        return ScoreSums(self.count + other.count, self.prob_sum + other.prob_sum, self.plogp_sum + other.plogp_sum)

    def score(self) -> tuple[float, float]:
        """(mean, std) over groups of exp(KL_g)."""
        if bool((self.count == 0).any()):
            raise ValueError(f"every Inception Score group needs samples; counts per group: {self.count.tolist()}")
        n = self.count.double()
        q = self.prob_sum / n[:, None]
        kl = self.plogp_sum / n - (q * q.log()).nan_to_num(0.0).sum(dim=1)  # 0 log 0 = 0
        scores = kl.exp()
        return float(scores.mean()), float(scores.std(unbiased=False))

    def state_dict(self) -> dict:
        return {"count": self.count, "prob_sum": self.prob_sum, "plogp_sum": self.plogp_sum}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ScoreSums":
        return cls(state["count"].long(), state["prob_sum"].double(), state["plogp_sum"].double())


def score_sums(logits: Tensor, indices: Tensor, total: int, *, splits: int = IS_SPLITS,
               seed: int = IS_SEED) -> ScoreSums:
    """The `ScoreSums` of samples with class `logits` (n, K) and global `indices` (n,) in a set of `total`."""
    _check_logits(logits)
    if indices.shape != (logits.shape[0],):
        raise ValueError(f"need one index per sample: logits {tuple(logits.shape)}, indices {tuple(indices.shape)}")
    groups = score_groups(indices.cpu(), total, splits, seed)
    logp = logits.detach().double().cpu().log_softmax(dim=1)
    p = logp.exp()
    k = logits.shape[1]
    count = torch.zeros(splits, dtype=torch.long).index_add_(0, groups, torch.ones_like(groups))
    prob_sum = torch.zeros(splits, k, dtype=torch.float64).index_add_(0, groups, p)
    plogp_sum = torch.zeros(splits, dtype=torch.float64).index_add_(0, groups, (p * logp).sum(dim=1))
    return ScoreSums(count, prob_sum, plogp_sum)


def inception_score(logits: Tensor, *, splits: int = IS_SPLITS, seed: int = IS_SEED) -> tuple[float, float]:
    """(mean, std) Inception Score of a whole set's class logits (N, K)."""
    _check_logits(logits)
    return score_sums(logits, torch.arange(len(logits)), len(logits), splits=splits, seed=seed).score()
