"""The Ray Train backend's pieces that need no cluster: the streamed batches, the checks
that refuse a configuration before anything is scheduled. The backend itself runs against a
real Ray head in tests/integration/test_ray_train.py."""
import numpy as np
import pytest
import torch

from lzn.data.batches import StepBatcher
from orchestration.ray.train import StreamedBatches, check_cpus
from orchestration.run import RayTrainerConfig, validate_trainer


class FakeShard:
    """What ray.train.get_dataset_shard returns, over a fixed array: passes in row order,
    recording the shuffle seed each pass asks for; each numpy batch goes through the
    stream's collate, as Ray Data's prefetch threads run it (on a CPU device, nothing moves)."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels, self.labels, self.seeds, self.collated = pixels, labels, [], []

    def iter_torch_batches(self, *, batch_size, drop_last, prefetch_batches, collate_fn, pin_memory, device,
                           local_shuffle_buffer_size, local_shuffle_seed):
        assert drop_last and prefetch_batches >= 2 and torch.device(device).type == "cpu" and not pin_memory
        self.seeds.append(local_shuffle_seed)
        for lo in range(0, len(self.pixels) - batch_size + 1, batch_size):
            batch = collate_fn({"image": self.pixels[lo : lo + batch_size], "label": self.labels[lo : lo + batch_size],
                                "pixel_max": np.full(batch_size, 16, np.int32)})
            self.collated.append(batch)
            yield batch


def batcher(rank=0, world=2):
    return StepBatcher(global_batch=8, seed=3, augment="none", image_size=2, two_view=False, rank=rank, world=world,
                       pixel_max=16)


def test_streamed_batches_convert_pixels_and_start_a_new_shuffled_pass_when_one_ends():
    pixels = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2, 1) % 17
    shard = FakeShard(pixels, np.arange(10))
    batches = StreamedBatches(shard, batcher(), seed=3)
    first = batches(0)
    rows = shard.collated[0]["image"]  # what crosses to the training thread: uint8 (B, C, H, W)
    assert rows.dtype == torch.uint8 and torch.equal(rows, torch.from_numpy(pixels[:4]).permute(0, 3, 1, 2))
    assert first["images"].shape == (4, 1, 2, 2)
    expected = torch.from_numpy(pixels[:4]).permute(0, 3, 1, 2).float() / 16 * 2 - 1
    torch.testing.assert_close(first["images"], expected)
    assert first["labels"].tolist() == [0, 1, 2, 3]
    assert batches(1)["labels"].tolist() == [4, 5, 6, 7]
    assert batches(2)["labels"].tolist() == [0, 1, 2, 3]  # 10 rows: 2 full batches a pass, then a new pass
    assert len(shard.seeds) == 2 and shard.seeds[0] != shard.seeds[1]
    other_rank = FakeShard(pixels, np.arange(10))
    StreamedBatches(other_rank, batcher(rank=1), seed=3)(0)
    assert other_rank.seeds[0] != shard.seeds[0]  # ranks shuffle independently


def test_mixed_size_rows_arrive_as_objects_and_are_stacked():
    images = np.empty(4, dtype=object)
    images[:] = [np.full((2, 2, 1), 16, np.uint8)] * 4
    shard = FakeShard(images, np.zeros(4, np.int64))
    batch = StreamedBatches(shard, batcher(), seed=0)(0)
    assert torch.equal(batch["images"], torch.ones(4, 1, 2, 2))


def test_full_resolution_rows_of_mixed_sizes_are_cropped_per_sample_before_stacking():
    # ImageNet through data.loader=stream with a cropping augmentation: the rows keep their
    # sizes and the batcher's RandomResizedCrop brings each to the task's size.
    images = np.empty(4, dtype=object)
    images[:] = [np.full((h, w, 3), 255, np.uint8) for h, w in [(30, 40), (17, 50), (64, 64), (20, 11)]]
    shard = FakeShard(images, np.arange(4))
    simclr = StepBatcher(global_batch=8, seed=3, augment="simclr", image_size=16, two_view=True, world=2)
    views = StreamedBatches(shard, simclr, seed=0)(0)["views"]
    assert views.shape == (2, 4, 3, 16, 16)
    ragged = shard.collated[0].images  # each row as stored, (C, H_i, W_i) uint8
    assert [tuple(x.shape) for x in ragged] == [(3, 30, 40), (3, 17, 50), (3, 64, 64), (3, 20, 11)]
    assert all(x.dtype == torch.uint8 for x in ragged)
    with pytest.raises(ValueError, match="cannot be stacked"):  # no cropping augmentation: refused, not squashed
        StreamedBatches(FakeShard(images, np.arange(4)), batcher(), seed=0)(0)


def test_a_shard_without_a_full_batch_says_so():
    shard = FakeShard(np.zeros((3, 2, 2, 1), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="no full batch of 4 rows"):
        StreamedBatches(shard, batcher(), seed=0)(0)


def test_configurations_that_would_wait_forever_are_refused():
    two = RayTrainerConfig(num_workers=2, cpus_per_worker=1)
    with pytest.raises(ValueError, match="needs 2 CPUs; this Ray has 1"):
        check_cpus(two, 1, stream=False, autoscaling=False)
    with pytest.raises(ValueError, match=r"at least 1 CPU beside the workers.*e\.g\. 0\.5"):
        check_cpus(two, 2, stream=True, autoscaling=False)
    check_cpus(RayTrainerConfig(num_workers=2, cpus_per_worker=0.5), 2, stream=True, autoscaling=False)
    check_cpus(two, 1, stream=True, autoscaling=True)  # a cluster that can add nodes may fit it later
    with pytest.raises(ValueError, match="divisible by trainer.num_workers=3"):
        validate_trainer(RayTrainerConfig(num_workers=3), 8)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        validate_trainer(RayTrainerConfig(num_workers=0), 8)
