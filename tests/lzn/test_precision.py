"""lzn.precision: the zoning math in IEEE float32 inside bf16 autocast and with TF32 on, the
caller's settings restored after."""
import pytest
import torch

from lzn.zoning import alignment_loss, compute_latents


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


def _precision() -> tuple:
    b = torch.backends
    return b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision()


@pytest.fixture
def tf32_on():
    """TF32 on as a GPU run turns it on for its networks; the defaults restored after."""
    b = torch.backends
    saved = _precision()
    torch.set_float32_matmul_precision("high")
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(saved[2])
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved[0], saved[1]


def test_zoning_forward_and_backward_run_with_tf32_off(tf32_on, monkeypatch):
    """TF32 (10-bit mantissa) would ruin logits scaled by up to 1/eps^2: inside every zoning
    call, and inside the backward of its posterior GEMMs (which runs later, in the caller's
    loss.backward()), TF32 and reduced-precision float32 matmuls are off; the caller's
    settings hold before, between and after."""
    from lzn import posterior

    seen = []
    forward, backward = posterior._PosteriorMean.forward, posterior._PosteriorMean.backward

    def watched(fn, where):
        def run(ctx, *args):
            seen.append((where, _precision()))
            return fn(ctx, *args)
        return staticmethod(run)

    monkeypatch.setattr(posterior._PosteriorMean, "forward", watched(forward, "forward"))
    monkeypatch.setattr(posterior._PosteriorMean, "backward", watched(backward, "backward"))
    a = torch.randn(8, 3, requires_grad=True)
    z = compute_latents(a, torch.randn(8, 3), steps=3)
    assert _precision() == (True, True, "high")
    loss, _ = alignment_loss(z, a, torch.arange(8), steps=3)
    loss.backward()
    assert _precision() == (True, True, "high")
    assert {w for w, _ in seen} == {"forward", "backward"}
    assert {p for _, p in seen} == {(False, False, "highest")}


def test_precision_is_restored_after_an_error(tf32_on):
    a, e = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="steps"):
        compute_latents(a, e, steps=0)
    assert _precision() == (True, True, "high")
    from lzn.precision import ieee_float32

    with pytest.raises(KeyError):
        with ieee_float32():
            assert _precision() == (False, False, "highest")
            raise KeyError("boom")
    assert _precision() == (True, True, "high")


def test_precision_set_through_the_newer_api_is_restored_too():
    """torch's per-backend fp32_precision settings (the legacy flags cannot be read once a
    caller mixes the two APIs): ieee inside, the caller's value after."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flags")
    from lzn.precision import ieee_float32

    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with ieee_float32():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
