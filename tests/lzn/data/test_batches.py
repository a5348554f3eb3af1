import pytest
import torch

from lzn.data.batches import make_batches
from lzn.data.digits import digits_split
from lzn.data.stream import BatchStream, StepRandom


@pytest.fixture(scope="module")
def digits():
    return digits_split()


def test_digits_split_is_stratified_and_scaled(digits):
    assert digits.train_images.shape == (1257, 1, 8, 8) and digits.test_images.shape == (540, 1, 8, 8)
    assert digits.train_images.min() == -1 and digits.train_images.max() == 1
    share = torch.bincount(digits.test_labels, minlength=10) / torch.bincount(digits.train_labels, minlength=10)
    assert (share - 540 / 1257).abs().max() < 0.02


def test_batch_stream_covers_an_epoch_and_splits_by_rank():
    s = BatchStream(100, 20, seed=3)
    epoch = torch.cat([s.global_indices(k) for k in range(5)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(s.global_indices(0), s.global_indices(5))  # a new permutation per epoch
    halves = [BatchStream(100, 20, seed=3, rank=r, world=2).local_indices(7) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), s.global_indices(7))
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(100, 21, seed=0, world=2)


def test_step_random_is_rank_invariant():
    full = StepRandom(1, 5).normal(8, 3)
    parts = [StepRandom(1, 5, rank=r, world=2).normal(4, 3) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("augment", ["simclr_digits", "none"])
def test_views_are_deterministic_rank_invariant_and_distinct(digits, augment):
    def batches(rank=0, world=1):
        return make_batches(digits.train_images, digits.train_labels, global_batch=64, seed=2,
                            augment=augment, two_view=True, rank=rank, world=world)

    one = batches()(3)["views"]
    assert one.shape == (2, 64, 1, 8, 8) and one.min() >= -1 and one.max() <= 1
    assert torch.equal(batches()(3)["views"], one)  # same (seed, step): same views
    split = torch.cat([batches(r, 2)(3)["views"] for r in (0, 1)], dim=1)
    assert torch.equal(split, one)
    if augment == "none":
        assert torch.equal(one[0], one[1])
    else:
        assert (one[0] - one[1]).abs().mean() > 0.1  # two different views
        assert not torch.equal(batches()(4)["views"], one)
