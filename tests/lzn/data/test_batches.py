import pytest
import torch

from lzn import seeds
from lzn.data.batches import StepBatcher, make_batches
from lzn.data.digits import digits_split
from lzn.data.stream import BatchStream, StepRandom
from lzn.errors import UserError


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


def test_step_random_on_the_cpu_is_the_stream_results_were_trained_with():
    # The CPU stream is the definition: one CPU generator seeded by seeds.step_noise(seed,
    # step), the global batch drawn in call order, this rank's rows.
    g = torch.Generator().manual_seed(seeds.step_noise(4, 9))
    noise, times = torch.randn(8, 3, generator=g), torch.rand(8, generator=g)
    rng = StepRandom(4, 9, rank=1, world=2, device="cpu")
    a, b = rng.normal(4, 3), rng.uniform(4)
    assert torch.equal(a, noise[4:]) and torch.equal(b, times[4:])
    assert a.device.type == "cpu" and StepRandom(4, 9).normal(8, 3).device.type == "cpu"


def _as_uint8(images: torch.Tensor, pixel_max: int) -> torch.Tensor:
    return torch.round((images + 1) * pixel_max / 2).to(torch.uint8)


@pytest.mark.parametrize("augment", ["simclr_digits", "flip", "none"])
def test_uint8_batches_give_the_views_of_their_float_pixels(digits, augment):
    # Digits are stored as 0..16 (pixel_max 16): uint8 in, the same float pixels as the
    # reader's to_float (x 2 / 16 - 1) and so the same views.
    pixels = _as_uint8(digits.train_images, 16)
    assert torch.equal(pixels.float() * (2 / 16) - 1, digits.train_images)

    def batches(images, **kw):
        return make_batches(images, digits.train_labels, global_batch=64, seed=2, augment=augment, two_view=True,
                            **kw)

    ref = batches(digits.train_images)(5)
    got = batches(pixels, pixel_max=16)(5)
    assert torch.equal(got["views"], ref["views"]) and got["views"].dtype == torch.float32
    assert torch.equal(got["labels"], ref["labels"])


def test_uint8_lists_of_sizes_are_converted_with_pixel_max_before_cropping():
    g = torch.Generator().manual_seed(1)
    sizes = [(40, 60), (33, 33), (80, 20), (50, 70)]
    pixels = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    floats = [p.float() * (2 / 255) - 1 for p in pixels]
    b = StepBatcher(global_batch=4, seed=5, augment="simclr", image_size=16, two_view=False)
    labels = torch.arange(4)
    assert torch.equal(b(pixels, labels, step=2)["images"], b(floats, labels, step=2)["images"])
    assert torch.equal(b(torch.stack([p[:, :20, :20] for p in pixels]), labels, step=2)["images"],
                       b(torch.stack([f[:, :20, :20] for f in floats]), labels, step=2)["images"])


def test_bad_pixels_and_pixel_max_are_refused_by_name():
    with pytest.raises(UserError, match=r"pixel_max .* got 0"):
        StepBatcher(global_batch=2, seed=0, augment="none", image_size=2, two_view=False, pixel_max=0)
    b = StepBatcher(global_batch=2, seed=0, augment="none", image_size=2, two_view=False)
    with pytest.raises(UserError, match=r"uint8 .* or float .* got dtype torch.int64"):
        b(torch.zeros(2, 1, 2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), step=0)
