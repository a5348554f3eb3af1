"""A held-out split for a dataset that has none: stratified by class, seeded.

A folder of images without split folders is the common case; FID is measured against the
training set, but the probe, the classifier and the training curves need images the model
did not train on. Each class (or all images, unlabelled) gives `round(fraction * n)` of its
images, at least one and never all of a class of two or more, picked by a generator seeded
with (seed, label): the split does not change when another class is added or removed.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from lzn.errors import UserError

HELD_OUT_SPLITS = ("test", "val", "validation", "valid")  # the names a user's own split may have
HELD_OUT = "test"  # the name of the split made here


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise UserError(f"data.holdout must lie in [0, 1) (the fraction of each class held out when the data "
                        f"has no test or val split; 0: none), got {fraction}")


def held_out_count(n: int, fraction: float) -> int:
    """How many of a class of n images are held out."""
    if n < 2 or fraction == 0:
        return 0
    return min(max(int(round(fraction * n)), 1), n - 1)


def hold_out(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: True for the items held out, per label as the module doc says."""
    check_fraction(fraction)
    labels = np.asarray(labels, np.int64)
    out = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        k = held_out_count(len(members), fraction)
        rng = np.random.default_rng([seed, int(label) + 1])  # label -1 (unlabelled) is 0 here
        out[members[rng.permutation(len(members))[:k]]] = True
    return out


def counts(names: Sequence[str], held: np.ndarray) -> dict[str, dict[str, int]]:
    """Per class name ('' unlabelled): {"train": n, "test": k}."""
    total = collections.Counter(names)
    test = collections.Counter(n for n, h in zip(names, held) if h)
    return {name: {"train": total[name] - test[name], HELD_OUT: test[name]} for name in sorted(total)}
