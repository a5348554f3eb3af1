"""Latent parallelism: two gloo processes, each with half the batch, reproduce one process
with the whole batch (latents, alignment loss and anchor gradients)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lzn.distributed import all_gather_with_grad, global_indices, make_gather, settle
from lzn.errors import UserError
from lzn.zoning import alignment_loss, compute_latents
from tests.ports import free_port

B, Q, STEPS = 16, 5, 10
# Near tau = eps the flow is stiff: float64 rounding in the anchor gradients grows like
# 1/eps^2 (merely permuting a batch moves them by 2e-6 at eps = 1e-3, 2e-9 at 1e-2 and
# 1e-12 at 0.1). A start at 0.1 lets the comparison below stay at 1e-10, tight enough to
# catch any error in how the gathered anchors' gradients return to their owners.
EPS = 0.1


def _data():
    g = torch.Generator().manual_seed(0)
    view1 = torch.randn(B, Q, generator=g, dtype=torch.float64)
    view2 = view1 + 0.3 * torch.randn(B, Q, generator=g, dtype=torch.float64)
    noise = torch.randn(B, Q, generator=g, dtype=torch.float64)
    return view1, view2, noise


def _objective(a1, a2, noise, gather, targets):
    z = compute_latents(a1, noise, steps=STEPS, solver="dpm++", alpha=0.45, eps=EPS, gather=gather)
    loss, acc = alignment_loss(z, a2, targets, steps=STEPS, cutoff=0.2, eps=EPS, gather=gather)
    return z, loss


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        view1, view2, noise = _data()
        part = slice(rank * B // world, (rank + 1) * B // world)
        a1 = view1[part].clone().requires_grad_()
        a2 = view2[part].clone().requires_grad_()
        z, loss = _objective(a1, a2, noise[part], make_gather(), global_indices(B // world))
        loss.backward()
        torch.save({"z": z.detach(), "loss": loss.detach(), "g1": a1.grad, "g2": a2.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    view1, view2, noise = _data()
    a1, a2 = view1.clone().requires_grad_(), view2.clone().requires_grad_()
    z, loss = _objective(a1, a2, noise, None, torch.arange(B))
    loss.backward()

    torch.testing.assert_close(torch.cat([p["z"] for p in parts]), z.detach(), atol=1e-10, rtol=0)
    # Each rank's loss is the mean over its half; the global loss is their mean.
    torch.testing.assert_close(torch.stack([p["loss"] for p in parts]).mean(), loss.detach(),
                               atol=1e-10, rtol=0)
    # Gradients reaching each owner sum over ranks; DDP's averaging divides by the world.
    for key, full in (("g1", a1.grad), ("g2", a2.grad)):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]) / world, full,
                                   atol=1e-10, rtol=0)
    assert a1.grad.abs().sum() > 0 and a2.grad.abs().sum() > 0


def test_gather_is_identity_without_a_process_group():
    t = torch.randn(3, 2)
    assert all_gather_with_grad(t) is t
    assert torch.equal(global_indices(4), torch.arange(4))


def test_settle_without_a_process_group_is_this_process_alone():
    assert settle("a step", None, payload=["u1"]) == [["u1"]]
    own = UserError("no such file")
    with pytest.raises(UserError) as raised:
        settle("a step", own)
    assert raised.value is own  # this rank's own error as it is, not wrapped
    assert settle("a step", own, "p", raise_here=False) == ["p"]  # a rank that leaves the raising to another


def _shape_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import lzn.distributed

        checks, check = [], lzn.distributed._check_same_shape

        def counted(t, *args):
            checks.append(tuple(t.shape))
            return check(t, *args)

        lzn.distributed._check_same_shape = counted
        gathered = [all_gather_with_grad(torch.full(shape, float(rank))) for shape in [(4, 3), (4, 3), (2, 3), (4, 3)]]
        try:
            all_gather_with_grad(torch.zeros(5 + rank, 3))  # a shape new to both ranks, different on each
            error = ""
        except ValueError as e:
            error = str(e)
        torch.save({"checks": checks, "error": error, "gathered": gathered}, os.path.join(out_dir, f"shape{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_shapes_are_checked_once_per_shape(tmp_path):
    """The shape check is a collective plus a host read: it runs on the first call with each
    shape, and a mismatch met there still raises on every rank instead of hanging."""
    world = 2
    mp.start_processes(_shape_worker, args=(world, free_port(), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    for r in range(world):
        out = torch.load(tmp_path / f"shape{r}.pt", weights_only=True)
        assert out["checks"] == [(4, 3), (2, 3), (5 + r, 3)]
        assert "same shape on every rank" in out["error"] and "(5, 3)" in out["error"] and "(6, 3)" in out["error"]
        for g in out["gathered"]:
            n = g.shape[0] // world
            assert torch.equal(g, torch.cat([torch.zeros(n, 3), torch.ones(n, 3)]))
