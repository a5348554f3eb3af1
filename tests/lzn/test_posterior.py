"""The blocked posterior-mean kernel against the dense softmax in float64 (values and every
gradient), its block sizes, and the exact zero gradient of a one-hot row in float32."""
import pytest
import torch

from lzn import posterior

F64 = {"dtype": torch.float64}


def _dense(x, anchors, log_weights, tau, targets):
    """softmax(logits) a, logsumexp and log P(target) from the whole (B, N) logits."""
    scale, bias = posterior.logit_terms(anchors, (anchors * anchors).sum(dim=1), log_weights, tau)
    logits = scale * x @ anchors.t() + bias
    lse = torch.logsumexp(logits, dim=1)
    valid = (targets >= 0) & (targets < anchors.shape[0])
    target_logit = logits.gather(1, targets.clamp(0, anchors.shape[0] - 1).unsqueeze(1)).squeeze(1)
    return torch.softmax(logits, dim=1) @ anchors, lse, torch.where(valid, target_logit, 0.0) - lse


@pytest.mark.parametrize("b,n,q", [(6, 9, 4), (13, 4, 5), (1, 7, 3)])
@pytest.mark.parametrize("chunk", [1, 2, 3, None])
@pytest.mark.parametrize("outputs", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1)])
def test_values_and_gradients_match_the_dense_softmax(b, n, q, chunk, outputs):
    g = torch.Generator().manual_seed(b * n + q)
    x = torch.randn(b, q, generator=g, **F64).requires_grad_()
    anchors = (1.5 * torch.randn(n, q, generator=g, **F64)).requires_grad_()
    log_weights = torch.randn(n, generator=g, **F64)
    # Targets outside [0, n) are what unchecked values (check_values(False)) may pass.
    targets = torch.randint(-1, n + 1, (b,), generator=g)
    probes = [torch.randn(b, q, generator=g, **F64), torch.randn(b, generator=g, **F64),
              torch.randn(b, generator=g, **F64)]
    chunk = posterior.chunk_size(b, n, chunk)
    got = posterior.posterior_mean(x, anchors, (anchors * anchors).sum(dim=1), log_weights, 0.3, chunk, targets)
    want = _dense(x, anchors, log_weights, 0.3, targets)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-10)
    grads = []
    for result in (got, want):
        loss = sum((out * probe).sum() for used, out, probe in zip(outputs, result, probes) if used)
        grads.append(torch.autograd.grad(loss, (x, anchors)))
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_one_hot_rows_get_exactly_zero_gradient_in_float32(chunk):
    """At tau = 1e-4 the logit scale is 1e8: a row sitting on an anchor's path is one-hot,
    and its gradient w.r.t. x through m must be exactly 0, not float32 rounding times 1e8.
    That needs the backward's logits to equal the forward's bit for bit, in every block."""
    g = torch.Generator().manual_seed(3)
    tau = 1e-4
    anchors = 3.0 * torch.randn(16, 8, generator=g)
    x = ((1 - tau) * anchors[[2, 5, 5, 11, 0, 7, 9]]).requires_grad_()
    m, _, log_p = posterior.posterior_mean(x, anchors, (anchors * anchors).sum(dim=1), None, tau, chunk,
                                           torch.tensor([2, 5, 5, 11, 0, 7, 9]))
    assert torch.equal(m, anchors[[2, 5, 5, 11, 0, 7, 9]]) and torch.equal(log_p, torch.zeros(7))
    (grad,) = torch.autograd.grad((m * torch.randn(m.shape, generator=g)).sum() + log_p.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("b,n,chunk", [(4096, 4096, 1024), (6, 9, 3), (6, 9, 1), (1, 9, 9), (8, 3, 1)])
def test_blocks_hold_whole_rows_within_the_budget(b, n, chunk):
    for device in (torch.device("cpu"), torch.device("meta")):
        rows = posterior.rows_per_block(b, n, chunk, device)
        assert 1 <= rows <= b
        assert rows * n <= max(b * chunk, n)  # one row at least, else at most B x chunk posteriors
        if device.type == "cpu":
            assert rows * n <= max(posterior._CPU_BLOCK_ELEMENTS, n)
