"""lzn.data.loader: the prefetched in-memory batches are `make_batches`'s, produced ahead on
another thread; the shard stream gives each rank its own rows of each epoch and resumes where
it stopped; neither leaves a thread or a process behind."""
import multiprocessing
import threading

import pytest
import torch

from lzn.data.batches import StepBatcher, make_batches
from lzn.data.digits import digits_raw_split
from lzn.data.loader import Prefetcher, ShardBatches, prefetch_in_memory
from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.reader import ShardDataset
from lzn.errors import UserError

BOUND_S = 60  # a bound on waiting for the producer, never a measured time


@pytest.fixture(scope="module")
def digits():
    """The digits train split as stored: (n, 1, 8, 8) uint8 in [0, 16] and labels (n,)."""
    pixels, labels, _ = digits_raw_split()["train"]
    return torch.from_numpy(pixels).unsqueeze(1).contiguous(), torch.from_numpy(labels)


def _batcher(rank=0, world=1, augment="simclr_digits", two_view=True, global_batch=32):
    return StepBatcher(global_batch=global_batch, seed=5, augment=augment, image_size=8, two_view=two_view,
                       rank=rank, world=world, pixel_max=16)


def _same(a: dict, b: dict, local: int) -> None:
    assert a.keys() == b.keys()
    for key in a.keys() - {"rng"}:
        assert torch.equal(a[key], b[key]), key
    # The step's randomness: the same draws from both.
    assert torch.equal(a["rng"].normal(local, 3), b["rng"].normal(local, 3))


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_prefetched_batches_are_make_batches_step_by_step_and_after_a_resume(digits, rank, world):
    pixels, labels = digits
    plain = make_batches(pixels, labels, pixel_max=16, global_batch=32, seed=5, augment="simclr_digits",
                         two_view=True, rank=rank, world=world)
    local = 32 // world
    with prefetch_in_memory(pixels, labels, _batcher(rank, world)) as ahead:
        for step in range(12):  # past the end of the first epoch (1257 // 32 = 39 steps): see below
            _same(ahead(step), plain(step), local)
    with prefetch_in_memory(pixels, labels, _batcher(rank, world)) as resumed:
        for step in (7, 8, 9, 40, 41, 3):  # a resume at 7, then jumps (into the next epoch, back)
            _same(resumed(step), plain(step), local)


def test_the_producer_runs_ahead_on_another_thread():
    produced = {k: threading.Event() for k in range(6)}
    threads = {}

    def produce(step):
        threads[step] = threading.get_ident()
        produced[step].set()
        return step

    seen = []

    def consume(rows, step):
        if step == 0:  # step 0 is being consumed: steps 1 and 2 are produced meanwhile
            seen.append([produced[k].wait(BOUND_S) for k in (1, 2)])
        return {"rows": rows}

    with Prefetcher(produce, consume, ahead=2) as batches:
        assert [batches(k)["rows"] for k in range(4)] == [0, 1, 2, 3]
    assert seen == [[True, True]]
    assert threading.get_ident() not in {threads[k] for k in range(4)}  # gathered off the training thread


def test_the_in_memory_gather_runs_off_the_training_thread(digits, monkeypatch):
    from lzn.data import stream

    where, original = {}, stream.BatchStream.local_indices

    def spy(self, step):
        where[step] = threading.get_ident()
        return original(self, step)

    monkeypatch.setattr(stream.BatchStream, "local_indices", spy)
    with prefetch_in_memory(*digits, _batcher(two_view=False, augment="none")) as batches:
        for step in range(3):
            assert batches(step)["images"].dtype == torch.float32
    assert where and threading.get_ident() not in set(where.values())


def test_an_error_in_the_producer_is_raised_on_the_training_thread_and_the_next_call_restarts():
    def produce(step):
        if step == 3:
            raise OSError(f"shard of step {step} unreadable")
        return step

    batches = Prefetcher(produce, lambda rows, step: {"rows": rows})
    assert [batches(k)["rows"] for k in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="shard of step 3 unreadable"):
        batches(3)
    assert not _threads("lzn-prefetch")
    assert batches(1)["rows"] == 1  # a new producer from the step asked for
    batches.close()
    assert not _threads("lzn-prefetch")


def test_close_joins_the_producer_even_when_it_waits_on_a_full_queue():
    batches = Prefetcher(lambda step: step, lambda rows, step: {"rows": rows}, ahead=1)
    batches(0)
    assert len(_threads("lzn-prefetch")) == 1
    batches.close()  # the producer sits in put() with its queue full
    assert not _threads("lzn-prefetch")
    with pytest.raises(UserError, match="ahead=0"):
        Prefetcher(lambda step: step, lambda rows, step: rows, ahead=0)


# ------------------------------------------------------------------- the shard stream
@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "digits"
    prepare_dataset("digits", None, root, PrepareConfig(shard_rows=200))
    return root


def _stream(root, rank=0, world=1, workers=0, global_batch=32):
    return ShardBatches(root, _batcher(rank, world, augment="none", two_view=False, global_batch=global_batch),
                        image_size=8, channels=1, workers=workers)


def test_a_streamed_batch_holds_the_rows_it_names(digits_shards):
    ds = ShardDataset(digits_shards, "train")
    with _stream(digits_shards, rank=1, world=2, workers=1) as batches:
        for step in range(3):
            batch = batches(step)
            rows = batches.local_indices(step)
            assert torch.equal(batches.last_indices, rows) and len(rows) == 16
            images, labels = zip(*(ds[int(i)] for i in rows))  # the reader's own float images
            torch.testing.assert_close(batch["images"], torch.stack(images), rtol=0, atol=1e-6)
            assert batch["labels"].tolist() == list(labels)
    assert not multiprocessing.active_children()  # close() stopped the persistent workers


def test_ranks_read_disjoint_rows_each_epoch_and_a_new_order_the_next(digits_shards):
    n = len(ShardDataset(digits_shards, "train"))  # 1257: 629 rows a rank, 39 batches of 16
    parts = [_stream(digits_shards, rank=r, world=2) for r in (0, 1)]
    per_epoch = parts[0].steps_per_epoch
    assert per_epoch == (-(-n // 2)) // 16 == parts[1].steps_per_epoch

    def epoch_rows(stream, epoch):
        rows = [stream.local_indices(k) for k in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        return torch.cat(rows).tolist()

    for epoch in (0, 1):
        a, b = epoch_rows(parts[0], epoch), epoch_rows(parts[1], epoch)
        assert len(set(a)) == len(a) == len(b) == len(set(b)) == per_epoch * 16
        assert not set(a) & set(b)
    assert epoch_rows(parts[0], 0) != epoch_rows(parts[0], 1)


def test_a_resumed_stream_continues_where_it_stopped(digits_shards):
    with _stream(digits_shards) as straight:
        per_epoch = straight.steps_per_epoch
        steps = list(range(per_epoch + 3))  # into the second epoch
        expected = {k: straight(k) for k in steps}
        rows = {k: straight.local_indices(k) for k in steps}
    for start in (7, per_epoch + 1):
        with _stream(digits_shards) as resumed:
            for k in range(start, start + 2):
                got = resumed(k)
                assert torch.equal(resumed.last_indices, rows[k])
                assert torch.equal(got["images"], expected[k]["images"]) and torch.equal(got["labels"],
                                                                                         expected[k]["labels"])


def test_a_stream_whose_rank_holds_less_than_a_batch_is_refused(digits_shards):
    with pytest.raises(UserError, match="lower train.batch_size"):
        _stream(digits_shards, global_batch=1258)
    with pytest.raises(UserError, match="workers must be >= 0"):
        ShardBatches(digits_shards, _batcher(), image_size=8, channels=1, workers=-1)

