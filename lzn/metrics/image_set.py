"""Every metric of a generated image set from one pass of the feature extractor, in parts.

FID needs the features' moments, the Inception Score per-group sums of the class
probabilities (`lzn.metrics.inception_score`), KID and precision/recall the features
themselves. 50k x 2048 float32 features are 400 MB per set and precision/recall is
quadratic in N, so KID and precision/recall read a fixed seeded subset of each set
(`feature_subset`, as torch-fidelity's KID reads seeded subsets): the same rows whichever
worker computes them and however the set is sharded, and for the real set the same rows
each time, so its subset is cached with its moments. An `ImageSetPart` is what one
evaluation shard computes over rows [lo, hi) of a set: the moments of all its rows, the
features of its rows that are in the subset (with their global indices) and, for generated
sets of an extractor with logits, the Inception Score sums. Parts merge in shard order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from lzn.metrics.fid import (FeatureMoments, Images, MomentAccumulator, extract_batches, extractor_name,
                             frechet_distance, merge_in_order)
from lzn.metrics.inception_score import IS_SPLITS, ScoreSums, score_sums
from lzn.metrics.kid import KID_SUBSET_SIZE, kernel_inception_distance
from lzn.metrics.precision_recall import precision_recall

SUBSET_SEED = 2020


def feature_subset(total: int, size: int, seed: int = SUBSET_SEED) -> Tensor:
    """Sorted global indices (min(size, total),) of the rows of a set of `total` whose features
    KID and precision/recall read: a seeded uniform draw without replacement (all rows if size >= total)."""
    if total < 0 or size < 0:
        raise ValueError(f"feature_subset needs total >= 0 and size >= 0, got total={total}, size={size}")
    if size >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@dataclass(frozen=True)
class ImageSetPart:
    """moments of rows [lo, hi); subset_index (m,) int64 and subset_features (m, d) float32 of
    those rows in the set's subset; score: the Inception Score sums, or None (not computed)."""

    moments: FeatureMoments
    subset_index: Tensor
    subset_features: Tensor
    score: Optional[ScoreSums] = None

    def merge(self, other: "ImageSetPart") -> "ImageSetPart":
        if (self.score is None) != (other.score is None):
            raise ValueError("cannot merge image-set parts with and without Inception Score sums")
        return ImageSetPart(self.moments.merge(other.moments), torch.cat([self.subset_index, other.subset_index]),
                            torch.cat([self.subset_features, other.subset_features]),
                            None if self.score is None else self.score.merge(other.score))

    @classmethod
    def merge_all(cls, parts: Iterable["ImageSetPart"]) -> "ImageSetPart":
        return merge_in_order(parts, "image-set parts")

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict(), "subset_index": self.subset_index,
                "subset_features": self.subset_features,
                "score": None if self.score is None else self.score.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ImageSetPart":
        missing = {"moments", "subset_index", "subset_features", "score"} - set(state)
        if missing:
            raise ValueError(f"ImageSetPart state is missing {sorted(missing)}; got keys {sorted(state)}")
        return cls(FeatureMoments.from_state_dict(state["moments"]), state["subset_index"].long(),
                   state["subset_features"].float(),
                   None if state["score"] is None else ScoreSums.from_state_dict(state["score"]))


def image_set_part(images: Images, extractor: nn.Module, *, lo: int, total: int, subset: Tensor,
                   inception_score: bool, is_splits: int = IS_SPLITS, batch_size: int = 256) -> ImageSetPart:
    """The `ImageSetPart` of rows [lo, lo + N) of a set of `total`, from one extractor pass.

    images: (N, C, H, W) in [-1, 1] (or an iterable of batches, as `feature_moments`).
    subset: the set's `feature_subset`. inception_score: also the Inception Score sums (the
    extractor must give logits)."""
    acc, index, kept, score, row = MomentAccumulator(), [], [], None, lo
    for f, logits in extract_batches(images, extractor, batch_size=batch_size, logits=inception_score):
        acc.add(f)
        rows = torch.arange(row, row + f.shape[0])
        take = subset[(subset >= row) & (subset < row + f.shape[0])]
        index.append(take)
        kept.append(f[(take - row).to(f.device)].float().cpu())
        if logits is not None:
            s = score_sums(logits, rows, total, splits=is_splits)
            score = s if score is None else score.merge(s)
        row += f.shape[0]
    if row > total:
        raise ValueError(f"rows [{lo}, {row}) do not fit in a set of {total}")
    moments = acc.moments(extractor_name(extractor))
    return ImageSetPart(moments, torch.cat(index), torch.cat(kept), score)


def compare(reference: ImageSetPart, samples: ImageSetPart, *, device="cpu") -> dict[str, float]:
    """The metrics of generated `samples` against the real `reference` (both whole sets):
    fid; is, is_std (when samples carry score sums); kid, kid_std, kid_subset_size, precision,
    recall (when both carry subset features). KID's subsets are min(1000, subset sizes) rows."""
    out = {"fid": frechet_distance(reference.moments.stats(), samples.moments.stats())}
    if samples.score is not None:
        out["is"], out["is_std"] = samples.score.score()
    if len(reference.subset_index) and len(samples.subset_index):
        real, fake = reference.subset_features.to(device), samples.subset_features.to(device)
        size = min(KID_SUBSET_SIZE, len(real), len(fake))
        out["kid"], out["kid_std"] = kernel_inception_distance(real, fake, subset_size=size)
        out["kid_subset_size"] = float(size)
        out["precision"], out["recall"] = precision_recall(real, fake)
    return out
