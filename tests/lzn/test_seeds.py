import itertools

import pytest

from lzn import seeds

# The formulas the results were produced with, written out again: a changed formula fails.
ORACLES = {
    seeds.rank_rng: lambda s, r: s * 7919 + r,
    seeds.rank_rng_resumed: lambda s, k, r: s * 7919 + k * 31 + r,
    seeds.epoch_permutation: lambda s, e: s * 1_000_003 + e,
    seeds.step_noise: lambda s, k: (s * 1_000_003 + k) * 2 + 1,
    seeds.augmentation: lambda s, k, p, v: ((s * 1_000_003 + k) * 65_537 + p) * 4 + v,
    seeds.batch_augmentation: lambda s, k, v: (((s * 1_000_003 + k) * 65_537 + 0) * 4 + v) * 7 + 3,
    seeds.stream_shuffle: lambda s, p, r: (s * 1_000_003 + p) * 64 + r,
    seeds.row_group_order: lambda s, e: [s, e],
    seeds.latent_noise: lambda s, b: s * 100_003 + b,
    seeds.sample_noise: lambda s, b: s * 100_003 + 2 * b,
    seeds.sample_latents: lambda s, b: s * 100_003 + 2 * b + 1,
    seeds.reconstruction_draw: lambda s, d: s * 1000 + d,
    seeds.conditional_set: lambda s: s + 1,
}
ARGS = [(0, 0, 0, 0), (1, 2, 3, 1), (7, 1000, 255, 3), (123, 50_000, 4095, 2)]


@pytest.mark.parametrize("derive", list(ORACLES), ids=lambda f: f.__name__)
@pytest.mark.parametrize("args", ARGS, ids=str)
def test_each_seed_is_the_formula_results_were_produced_with(derive, args):
    arity = derive.__code__.co_argcount
    assert derive(*args[:arity]) == ORACLES[derive](*args[:arity])


def test_a_few_seeds_spelled_out():
    assert seeds.step_noise(0, 0) == 1
    assert seeds.augmentation(1, 2, 3, 1) == 262_149_310_753
    assert seeds.batch_augmentation(1, 2, 1) == 1_835_045_175_190
    assert seeds.stream_shuffle(2, 5, 3) == 128_000_707
    assert seeds.sample_latents(3, 10) == 300_030


# A small grid: 64 steps / epochs / batches / passes, 8 ranks, 64 positions, 2 views.
STEPS, RANKS, POSITIONS, VIEWS = range(64), range(8), range(64), range(2)


def _streams(seed: int) -> dict[str, set[int]]:
    """Every integer stream over the grid (row_group_order is numpy SeedSequence entropy, not an integer)."""
    steps, ranks, positions, views = STEPS, RANKS, POSITIONS, VIEWS
    return {
        "rank_rng": {seeds.rank_rng(seed, r) for r in ranks},
        "rank_rng_resumed": {seeds.rank_rng_resumed(seed, k, r) for k in steps for r in ranks},
        "epoch_permutation": {seeds.epoch_permutation(seed, e) for e in steps},
        "step_noise": {seeds.step_noise(seed, k) for k in steps},
        "augmentation": {seeds.augmentation(seed, k, p, v) for k in steps for p in positions for v in views},
        "batch_augmentation": {seeds.batch_augmentation(seed, k, v) for k in steps for v in views},
        "stream_shuffle": {seeds.stream_shuffle(seed, p, r) for p in steps for r in ranks},
        "latent_noise": {seeds.latent_noise(seed, b) for b in steps},
        "sample_noise": {seeds.sample_noise(seed, b) for b in steps},
        "sample_latents": {seeds.sample_latents(seed, b) for b in steps},
    }


# Overlaps of today's formulas, kept because changing one changes every result: resuming at
# step 0 on another number of workers re-seeds as a fresh start does (harmless), and the
# latent noise of inference batch 2i (2i + 1) is the image noise (latents) of generated batch i.
KNOWN_OVERLAPS = {
    ("rank_rng", "rank_rng_resumed"),
    ("latent_noise", "sample_noise"),
    ("latent_noise", "sample_latents"),
}


@pytest.mark.parametrize("seed", [
    pytest.param(0, marks=pytest.mark.xfail(strict=True, reason=(
        "with seed 0 every formula reduces to its small offsets, so most streams share seeds "
        "(e.g. epoch_permutation(0, 1) == step_noise(0, 0) == rank_rng(0, 1) == 1)"))),
    1, 2, 42,
])
def test_streams_of_different_purposes_do_not_share_seeds(seed):
    streams = _streams(seed)
    overlaps = {(a, b) for a, b in itertools.combinations(streams, 2) if streams[a] & streams[b]}
    assert overlaps == KNOWN_OVERLAPS


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_each_stream_gives_distinct_seeds_over_the_grid(seed):
    steps, ranks, positions, views = STEPS, RANKS, POSITIONS, VIEWS
    grids = {
        seeds.rank_rng_resumed: itertools.product(steps, ranks),
        seeds.augmentation: itertools.product(steps, positions, views),
        seeds.batch_augmentation: itertools.product(steps, views),
        seeds.stream_shuffle: itertools.product(steps, ranks),
        seeds.step_noise: ((k,) for k in steps),
        seeds.sample_noise: ((b,) for b in steps),
    }
    for derive, grid in grids.items():
        grid = list(grid)
        assert len({derive(seed, *g) for g in grid}) == len(grid), derive.__name__
