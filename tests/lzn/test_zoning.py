import math

import pytest
import torch
from scipy import stats

from lzn.zoning import (
    alignment_loss,
    assign_zones,
    compute_latents,
    zone_posterior,
    zone_velocity,
)
from tests.lzn import oracle

F64 = dict(dtype=torch.float64)


def _setup(b=6, n=9, q=4, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, q, generator=g, **F64) * 1.5 + offset
    x = torch.randn(b, q, generator=g, **F64)
    w = torch.rand(n, generator=g, **F64) + 0.1
    return anchors, x, w


@pytest.mark.parametrize("tau", [0.02, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_posterior_and_velocity_match_oracle(tau, weighted):
    anchors, x, w = _setup()
    lw = torch.log(w / w.sum()) if weighted else None
    torch.testing.assert_close(zone_posterior(x, anchors, tau, lw),
                               oracle.log_posterior(x, anchors, tau, lw), atol=1e-8, rtol=0)
    for chunk in (1, 4, None):
        torch.testing.assert_close(zone_velocity(x, anchors, tau, lw, chunk_size=chunk),
                                   oracle.velocity(x, anchors, tau, lw), atol=1e-8, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 0.45, 0.0])
def test_latents_euler_match_oracle(alpha):
    anchors, _, w = _setup(n=10)
    noise = torch.randn_like(anchors)
    for chunk in (3, None):
        got = compute_latents(anchors, noise, steps=12, solver="euler", alpha=alpha, eps=1e-2,
                              weights=w, chunk_size=chunk)
        want = oracle.latents_euler(anchors, noise, anchors, 12, 1e-2, alpha, torch.log(w / w.sum()))
        torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


def test_latent_gradient_matches_oracle():
    anchors, _, _ = _setup(n=8)
    noise = torch.randn_like(anchors)
    probe = torch.randn_like(anchors)
    a1 = anchors.clone().requires_grad_()
    (compute_latents(a1, noise, steps=10, eps=1e-2, chunk_size=3) * probe).sum().backward()
    a2 = anchors.clone().requires_grad_()
    (oracle.latents_euler(a2, noise, a2, 10, 1e-2) * probe).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-8, rtol=0)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("cutoff", [0.0, 0.2, 0.5])
def test_alignment_loss_and_gradient_match_oracle(log, cutoff):
    anchors, _, w = _setup(n=7, offset=0.0)
    lw = torch.log(w / w.sum())
    latents = torch.randn(5, anchors.shape[1], **F64)
    targets = torch.tensor([0, 3, 3, 6, 1])
    a1, z1 = anchors.clone().requires_grad_(), latents.clone().requires_grad_()
    loss, acc = alignment_loss(z1, a1, targets, steps=10, cutoff=cutoff, log=log, weights=w,
                               eps=1e-2, chunk_size=2)
    loss.backward()
    a2, z2 = anchors.clone().requires_grad_(), latents.clone().requires_grad_()
    want, want_acc = oracle.alignment_euler(z2, a2, targets, 10, 1e-2, cutoff, log, lw)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-8, rtol=0)
    assert acc.item() == pytest.approx(want_acc.item())
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-8, rtol=0)
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "dpm++3m"])
def test_gradcheck(solver):
    anchors, _, w = _setup(n=5, q=3, offset=0.0)
    noise = torch.randn_like(anchors)
    targets = torch.tensor([4, 0, 2, 2, 1])

    def f(a, wt):
        z = compute_latents(a, noise, steps=6, solver=solver, eps=0.05, chunk_size=2)
        loss, _ = alignment_loss(z, a * 1.1, targets, steps=6, solver=solver, eps=0.05)
        return z, loss

    assert torch.autograd.gradcheck(f, (anchors.clone().requires_grad_(), w))


def test_backward_stores_trajectory_not_posteriors():
    """No tensor saved for backward is as large as the (B, N) posterior of one step."""
    b = n = 48
    anchors = torch.randn(n, 3, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = compute_latents(anchors, torch.randn(n, 3), steps=20, solver="dpm++3m")
        loss, _ = alignment_loss(z, anchors, torch.arange(b), steps=20)
    loss.backward()
    assert saved and max(saved) < b * n


@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "dpm++3m"])
def test_single_anchor_flow_is_exact(solver):
    """One anchor: x_tau = (1 - tau) a + tau * alpha * e exactly, so latent = alpha * e."""
    a = torch.randn(1, 5, **F64) * 4
    e = torch.randn(1, 5, **F64)
    for steps in (1, 3, 20):
        z = compute_latents(a, e, steps=steps, solver=solver, alpha=0.7, eps=1e-3)
        torch.testing.assert_close(z, 0.7 * e, atol=1e-9, rtol=0)


def test_latents_are_standard_gaussian():
    # Anchors far from Gaussian: a tight 4-D cube offset from the origin.
    g = torch.Generator().manual_seed(1)
    anchors = torch.rand(4096, 4, generator=g) * 2 + 1
    noise = torch.randn(4096, 4, generator=g)
    z = compute_latents(anchors.double(), noise.double(), steps=40, solver="dpm++2m", eps=1e-3)
    assert z.mean(dim=0).abs().max() < 0.05
    assert (z.std(dim=0) - 1).abs().max() < 0.05
    for d in range(4):
        assert stats.kstest(z[:, d].numpy(), "norm").pvalue > 1e-3
        # The test has teeth: scaled noise alone and the anchors themselves fail it.
        assert stats.kstest((0.45 * noise[:, d]).numpy(), "norm").pvalue < 1e-6
        assert stats.kstest(anchors[:, d].numpy(), "norm").pvalue < 1e-6


@pytest.mark.parametrize("solver,steps", [("euler", 400), ("dpm++2m", 20), ("dpm++3m", 80)])
def test_latent_flows_back_to_its_anchor(solver, steps):
    g = torch.Generator().manual_seed(2)
    anchors = torch.randn(512, 16, generator=g) * 2
    z = compute_latents(anchors, torch.randn(512, 16, generator=g), steps=steps, solver=solver, eps=1e-3)
    back = assign_zones(z, anchors, steps=steps, solver=solver, eps=1e-3, chunk_size=100)
    assert (back == torch.arange(512)).float().mean() >= 0.99


def test_dpm_solver_20_steps_agrees_with_euler_2000():
    g = torch.Generator().manual_seed(3)
    anchors = torch.randn(256, 8, generator=g, **F64)
    noise = torch.randn(256, 8, generator=g, **F64)
    ref = compute_latents(anchors, noise, steps=2000, solver="euler")

    def rel(z):
        return ((z - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()

    euler20 = rel(compute_latents(anchors, noise, steps=20, solver="euler"))
    for solver in ("dpm++2m", "dpm++3m"):
        err = rel(compute_latents(anchors, noise, steps=20, solver=solver))
        assert err < 0.02 and err < euler20 / 2, (solver, err, euler20)


@pytest.mark.parametrize("solver,min_ratio", [("euler", 1.7), ("dpm++2m", 3.0), ("dpm++3m", 4.0)])
def test_solver_convergence_order(solver, min_ratio):
    """Doubling the steps cuts the error by ~2^order (measured against a 1000-step run)."""
    g = torch.Generator().manual_seed(4)
    anchors = torch.randn(256, 8, generator=g, **F64)
    noise = torch.randn(256, 8, generator=g, **F64)
    ref = compute_latents(anchors, noise, steps=1000, solver="dpm++3m")
    errs = [(compute_latents(anchors, noise, steps=s, solver=solver) - ref).norm().item() for s in (40, 80)]
    assert errs[0] / errs[1] > min_ratio, errs


def test_float32_stable_for_large_anchors_and_tiny_tau():
    g = torch.Generator().manual_seed(5)
    anchors = (torch.randn(64, 8, generator=g) * 1e3).requires_grad_()
    x = anchors.detach()[:16] * (1 - 1e-4) + 1e-4 * torch.randn(16, 8, generator=g)
    lp = zone_posterior(x, anchors, 1e-4)
    assert torch.isfinite(lp).all()
    assert torch.equal(lp.argmax(dim=1), torch.arange(16))
    assert torch.isfinite(zone_velocity(x, anchors, 1e-4)).all()
    z = compute_latents(anchors, torch.randn(64, 8, generator=g), steps=20, solver="dpm++", eps=1e-4)
    loss, _ = alignment_loss(z, anchors, torch.arange(64), steps=20, eps=1e-4)
    loss.backward()
    assert torch.isfinite(z).all() and torch.isfinite(loss) and torch.isfinite(anchors.grad).all()


def test_zero_weight_anchor_gets_no_zone():
    anchors = torch.randn(6, 3, **F64)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 1.0], **F64)
    lp = zone_posterior(torch.randn(4, 3, **F64), anchors, 0.5, torch.log(w))
    assert torch.isneginf(lp[:, [1, 4]]).all()
    z = compute_latents(anchors, torch.randn(6, 3, **F64), steps=10, weights=w)
    assert torch.isfinite(z).all()
    assert not {1, 4} & set(assign_zones(z, anchors, steps=10, weights=w).tolist())


# ----------------------------------------------------------------------- bad input
def _ok():
    return torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, e: compute_latents(a, torch.randn(4, 2), steps=5), "noise"),
        (lambda a, e: compute_latents(a, e[:3], steps=5), "noise"),
        (lambda a, e: compute_latents(a * float("nan"), e, steps=5), "anchors"),
        (lambda a, e: compute_latents(a.clone().fill_(float("inf")), e, steps=5), "anchors"),
        (lambda a, e: compute_latents(a, e, steps=0), "steps"),
        (lambda a, e: compute_latents(a, e, steps=5, eps=0.0), "eps"),
        (lambda a, e: compute_latents(a, e, steps=5, solver="rk4"), "solver"),
        (lambda a, e: compute_latents(a, e, steps=5, weights=torch.zeros(4)), "weights"),
        (lambda a, e: compute_latents(a, e, steps=5, weights=-torch.ones(4)), "weights"),
        (lambda a, e: compute_latents(a, e, steps=5, weights=torch.ones(3)), "weights"),
        (lambda a, e: alignment_loss(e, a, torch.arange(4), steps=5, cutoff=1.0), "cutoff"),
        (lambda a, e: alignment_loss(e, a, torch.arange(4), steps=5, cutoff=-0.1), "cutoff"),
        (lambda a, e: alignment_loss(e, a, torch.arange(1, 5), steps=5), "targets"),
        (lambda a, e: alignment_loss(e[:, :2], a, torch.arange(4), steps=5), "latents"),
        (lambda a, e: zone_posterior(e, a, 0.0), "tau"),
        (lambda a, e: zone_velocity(e, a[:, :2], 0.5), "x"),
        (lambda a, e: assign_zones(e, a, steps=-1), "steps"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    a, e = _ok()
    with pytest.raises(ValueError, match=match):
        call(a, e)


def test_flow_anchors_give_latents_inside_a_label_zone():
    """Latents of label anchors picked per sample, in the flow of all labels, flow back to them."""
    labels_anchors = torch.randn(10, 6, **F64) * 3
    picks = torch.tensor([3, 3, 7, 0, 9, 3])
    z = compute_latents(labels_anchors[picks], torch.randn(6, 6, **F64), steps=40, solver="dpm++",
                        flow_anchors=labels_anchors)
    assert torch.equal(assign_zones(z, labels_anchors, steps=40, solver="dpm++"), picks)
    with pytest.raises(ValueError, match="flow_anchors"):
        compute_latents(labels_anchors[picks], torch.randn(6, 6, **F64), steps=4,
                        flow_anchors=labels_anchors, gather=lambda t: t)


def test_runs_in_float32_inside_bf16_autocast():
    anchors = torch.randn(32, 8, requires_grad=True)
    noise = torch.randn(32, 8)
    want = compute_latents(anchors, noise, steps=10, solver="dpm++")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_latents(anchors.bfloat16(), noise, steps=10, solver="dpm++")
        loss, _ = alignment_loss(got, anchors, torch.arange(32), steps=10)
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    # Only the bf16 rounding of the anchors themselves remains.
    assert (got - want).abs().max() < 0.1
    loss.backward()
    assert torch.isfinite(anchors.grad).all()


@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_float32_gradients_match_float64(eps):
    """Near the anchors the posterior is one-hot and the logit scale is ~1/eps^2: float32
    rounding must not be amplified into the anchor gradients (latents and alignment)."""
    g = torch.Generator().manual_seed(6)
    anchors, other = torch.randn(32, 16, generator=g) * 2, torch.randn(32, 16, generator=g) * 2
    noise, probe = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = anchors.to(dtype, copy=True).requires_grad_()
        b = (a.detach() + 0.1 * other.to(dtype)).requires_grad_()
        z = compute_latents(a, noise.to(dtype), steps=8, solver="dpm++", eps=eps)
        loss, _ = alignment_loss(z, b, torch.arange(32), steps=8, eps=eps, cutoff=0.2)
        (loss + (z * probe.to(dtype)).mean()).backward()
        grads[dtype] = torch.cat([a.grad.flatten(), b.grad.flatten()]).double()
    err = (grads[torch.float32] - grads[torch.float64]).norm() / grads[torch.float64].norm()
    # The unfused kernel was off by a factor 1e3 (eps 1e-3) to 1e6 (eps 1e-4) here.
    assert err < 1e-2, err
