"""Every seed derived from a run's seed: one function per random stream.

Each function keys one stream by the run seed and the indices that make the stream a pure
function of where it is drawn (step, batch, rank, ...), so a resumed run, a shard of a set
or another number of workers draws exactly what one uninterrupted process would. The
formulas are the ones the trained weights, sampled images and FID values were produced
with: changing one changes every result downstream.
"""
from __future__ import annotations


# ---------------------------------------------------------------- training (lzn.trainer, lzn.data)
def rank_rng(seed: int, rank: int) -> int:
    """The global torch RNG of `rank` when a run starts from scratch (Trainer.fit)."""
    return seed * 7919 + rank


def rank_rng_resumed(seed: int, step: int, rank: int) -> int:
    """The global torch RNG of `rank` after resuming at `step` on another number of workers."""
    return seed * 7919 + step * 31 + rank


def epoch_permutation(seed: int, epoch: int) -> int:
    """The permutation of the dataset whose slices are the global batches of `epoch` (BatchStream)."""
    return seed * 1_000_003 + epoch


def step_noise(seed: int, step: int) -> int:
    """Latent noise, RF times and RF noise of the global batch of training `step` (StepRandom)."""
    return (seed * 1_000_003 + step) * 2 + 1


def augmentation(seed: int, step: int, position: int, view: int) -> int:
    """The per-sample augmentation of `view` of the sample at `position` in the global batch of `step`."""
    return ((seed * 1_000_003 + step) * 65_537 + position) * 4 + view


def batch_augmentation(seed: int, step: int, view: int) -> int:
    """The whole-batch augmentation (BatchAugment) of `view` of the global batch of `step`."""
    return augmentation(seed, step, 0, view) * 7 + 3


def stream_shuffle(seed: int, pass_index: int, rank: int) -> int:
    """Ray Data's local shuffle buffer of worker `rank` in its `pass_index`-th pass over its shard."""
    return (seed * 1_000_003 + pass_index) * 64 + rank


def row_group_order(seed: int, epoch: int) -> list[int]:
    """numpy's SeedSequence entropy for the row-group and row order of `epoch` (RowGroupSampler)."""
    return [seed, epoch]


# ---------------------------------------------------------------- inference (lzn.inference)
def latent_noise(seed: int, batch: int) -> int:
    """The latent-flow noise of the images of global inference batch `batch` (LZNModel.latents)."""
    return seed * 100_003 + batch


def sample_noise(seed: int, batch: int) -> int:
    """The image noise of generated global batch `batch` (LZNModel.generate)."""
    return seed * 100_003 + 2 * batch


def sample_latents(seed: int, batch: int) -> int:
    """The latents (or label-zone latent noise) of generated global batch `batch` (LZNModel.generate)."""
    return seed * 100_003 + 2 * batch + 1


# ---------------------------------------------------------------- evaluation (lzn.evaluate)
RECONSTRUCTION_DRAWS = 1000  # draws per image at most: draw d of seed s is seed s * 1000 + d


def reconstruction_draw(seed: int, draw: int) -> int:
    """The latent-noise seed of reconstruction draw `draw` (0 <= draw < RECONSTRUCTION_DRAWS):
    every draw a new latent in each image's zone, the same for the Euler set."""
    return seed * RECONSTRUCTION_DRAWS + draw


def conditional_set(seed: int) -> int:
    """The seed of the class-conditional set (one apart from the FID set's `seed`)."""
    return seed + 1
