"""Gradient averaging that overlaps backward (`lzn.distributed.GradientBuckets` inside the
trainer), on two gloo processes.

The oracle is the definition of data-parallel training: before each step every rank
computes its local gradients of the same loss with plain autograd (no hooks), a missing
gradient counting as zeros; their mean over ranks is what the trainer's optimizer must see.
The run crosses a freeze_after boundary (the buckets are rebuilt), has a parameter no rank
uses and one only rank 0 uses, a channels_last convolution, many small buckets, and a step whose loss is NaN on rank 1
only, which both ranks skip. It also counts the project's host conversions inside steps.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lzn.objectives import GenerationObjective, LatentConfig
from tests.lzn.toy import ToyDecoder, ToyEncoder, toy_images
from tests.ports import free_port

STEPS, FREEZE, NAN_STEP, NAN_RANK = 5, 2, 3, 1


class _Extra(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(3, 2)  # no rank uses it
        self.rank0 = nn.Parameter(torch.randn(4))  # only rank 0's loss uses it
        self.conv = nn.Conv2d(1, 2, 3).to(memory_format=torch.channels_last)  # strides not contiguous


class _Objective(GenerationObjective):
    def __init__(self, gather):
        super().__init__(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4), gather)
        self.extra = _Extra()
        self.step = 0  # set by the worker: which step's batch this loss is of

    def loss(self, batch):
        loss, metrics = super().loss(batch)
        loss = loss + 0.1 * self.extra.conv(batch["images"].to(memory_format=torch.channels_last)).square().mean()
        if dist.get_rank() == 0:
            loss = loss + 0.1 * (self.extra.rank0 ** 2).sum()
        if dist.get_rank() == NAN_RANK and self.step == NAN_STEP:
            loss = loss * float("nan")
        return loss, metrics


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import lzn.distributed
        from lzn.data.batches import make_batches
        from lzn.trainer import OptimConfig, Trainer, TrainConfig
        from tests.lzn.test_host_syncs import HostConversions

        lzn.distributed.BUCKET_BYTES = 40  # several buckets even for the toy networks
        torch.manual_seed(0)
        objective = _Objective(lzn.distributed.make_gather())
        images, labels = toy_images()
        batches = make_batches(images, labels, global_batch=16, seed=0, augment="none", two_view=False,
                               rank=rank, world=world)
        optim = OptimConfig(lr={"encoder": 1e-2, "decoder": 1e-2, "extra": 1e-2}, warmup=1,
                            grad_clip=1e9)  # no clipping: the optimizer sees the averaged gradients
        train = TrainConfig(iterations=STEPS, batch_size=16, freeze_after={"decoder": FREEZE}, progress=False)
        trainer = Trainer(objective, optim, train, batches, run_dir=os.path.join(out_dir, "run"))
        names = [n for n, _ in objective.named_parameters()]
        seen = {}
        trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update(
            grads=[None if p.grad is None else p.grad.clone() for p in objective.parameters()]))
        finish = lzn.distributed.GradientBuckets.finish

        def finish_watched(self):  # how many buckets backward itself launched, of how many
            seen["launched"] = (self._next, len(self.buckets))
            return finish(self)

        lzn.distributed.GradientBuckets.finish = finish_watched
        out = {"local": [], "reduced": [], "params": [], "skipped": [], "launched": [], "names": names}
        with HostConversions() as counter:
            for step in range(STEPS):
                trainer._apply_freezing()  # the step's trainable set, as train_step sets it
                objective.step = step
                trainable = [p for p in objective.parameters() if p.requires_grad]
                loss, _ = objective.loss(batches(step))
                local = dict(zip([id(p) for p in trainable],
                                 torch.autograd.grad(loss, trainable, allow_unused=True)))
                out["local"].append([None if not p.requires_grad else
                                     (local[id(p)] if local[id(p)] is not None else torch.zeros_like(p))
                                     for p in objective.parameters()])
                counter.counting = True
                metrics = trainer.train_step()
                counter.counting = False
                out["reduced"].append(seen["grads"])
                assert all(p.grad is None or p.grad.stride() == p.stride() for p in objective.parameters())
                out["launched"].append(seen["launched"])
                out["params"].append([p.detach().clone() for p in objective.parameters()])
                out["skipped"].append(float(metrics["train/skipped"]))
        out["syncs"] = counter.calls
        out["skipped_total"] = trainer.skipped
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_overlapped_gradients_are_the_mean_of_the_local_ones(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    names = runs[0]["names"]
    for step in range(STEPS):
        for i, name in enumerate(names):
            local = [run["local"][step][i] for run in runs]
            if name.startswith("decoder.") and step >= FREEZE:
                # Frozen: no gradient anywhere, no bucket for it.
                assert all(g is None for g in local) and all(run["reduced"][step][i] is None for run in runs)
                continue
            if step == NAN_STEP:
                continue  # rank 1's gradients are NaN; the step is skipped (below)
            want = (local[0] + local[1]) / world
            for run in runs:
                torch.testing.assert_close(run["reduced"][step][i], want, rtol=1e-6, atol=1e-7, msg=name)
            if name.startswith("extra.unused"):
                assert torch.equal(want, torch.zeros_like(want))
            if name == "extra.rank0":
                assert local[1].abs().sum() == 0 and local[0].abs().sum() > 0
    # The NaN on rank 1 skips the step on both ranks: no parameter moves, the count agrees.
    for run in runs:
        assert run["skipped"] == [1.0 if s == NAN_STEP else 0.0 for s in range(STEPS)]
        assert run["skipped_total"] == 1
        for before, after in zip(run["params"][NAN_STEP - 1], run["params"][NAN_STEP]):
            assert torch.equal(before, after)
        assert any(not torch.equal(b, a) for b, a in zip(run["params"][NAN_STEP], run["params"][NAN_STEP + 1]))
    # The all-reduces start during backward (or before it, for buckets of parameters the
    # loss cannot reach), from the second step on: the first shows that extra.unused (the
    # first bucket) gets no gradient, which the later steps find in the graph up front.
    for run in runs:
        assert all(buckets >= 3 for _, buckets in run["launched"])
        assert all(launched == buckets for launched, buckets in run["launched"][1:])
    # Both ranks hold the same weights, and the steps read nothing back to the host.
    for p0, p1 in zip(runs[0]["params"][-1], runs[1]["params"][-1]):
        assert torch.equal(p0, p1)
    assert runs[0]["syncs"] == [] and runs[1]["syncs"] == []
