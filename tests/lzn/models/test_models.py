"""The model zoo: registries, paper-size presets, shapes, conditioning, gradients, a fit.

Parameter counts are printed with `pytest -s`. The whole file runs in well under a minute
on 2 CPU cores; the 256px steps at batch 1 are most of it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lzn.data.digits import digits_split
from lzn.models import DECODERS, ENCODERS, LabelAnchors, build_decoder, build_encoder
from lzn.models.layers import SelfAttention2d, fir_downsample_2d, fir_kernel_2d, fir_upsample_2d

# name -> (build kwargs, paper parameter count in millions)
PAPER_ENCODERS = {
    "ncsnpp_cifar10": (dict(latent_dim=200, image_size=32, channels=3), 49.8),
    "ncsnpp_256": (dict(latent_dim=200, image_size=256, channels=3), 87.8),
    "resnet50_gn": (dict(latent_dim=256, image_size=224, channels=3), 24.0),
}
PAPER_DECODERS = {
    "ddpmpp_cifar10": (dict(image_size=32, channels=3, cond_dim=200), 61.9),
    "ncsnpp_256": (dict(image_size=256, channels=3, cond_dim=200), 65.7),
}
# torchvision resnet50 without fc (GroupNorm has as many parameters as BatchNorm), and the
# head described in the paper and the reference code: Linear(2048, 2048, no bias),
# GN(32, 2048), ReLU, Linear(2048, 256, no bias), GN(32, 256).
RESNET50_BACKBONE = 25_557_032 - (2048 * 1000 + 1000)
RESNET50_HEAD = 2048 * 2048 + 2 * 2048 + 2048 * 256 + 2 * 256

_built: dict[tuple[str, str], torch.nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The suite shares 2 cores with other processes; there, 2 intra-op threads that wait on
    each other at every op made this file 4x slower (250 s) than one thread (60 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str, name: str) -> torch.nn.Module:
    """Each paper preset is built once per session (they are 28M-88M parameters)."""
    if (kind, name) not in _built:
        torch.manual_seed(0)
        kwargs = (PAPER_ENCODERS if kind == "encoder" else PAPER_DECODERS)[name][0]
        _built[kind, name] = (build_encoder if kind == "encoder" else build_decoder)(name, **kwargs)
    return _built[kind, name]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


PAPER_PRESETS = [("encoder", n) for n in PAPER_ENCODERS] + [("decoder", n) for n in PAPER_DECODERS]


# ------------------------------------------------------------------------------ registry
def test_registries_list_every_preset_and_reject_unknown_names():
    assert set(ENCODERS) == {"digits_cnn", "ncsnpp_tiny", "ncsnpp_cifar10", "ncsnpp_128", "ncsnpp_256", "resnet50_gn"}
    assert set(DECODERS) == {"unet_digits", "unet_tiny", "ddpmpp_cifar10", "ncsnpp_128", "ncsnpp_256"}
    with pytest.raises(ValueError, match="unknown encoder 'vit'.*digits_cnn.*resnet50_gn"):
        build_encoder("vit", latent_dim=8, image_size=8, channels=1)
    with pytest.raises(ValueError, match="unknown decoder 'dit'.*ddpmpp_cifar10.*unet_digits"):
        build_decoder("dit", image_size=8, channels=1, cond_dim=0)


def test_overrides_replace_config_fields_and_reject_unknown_keys():
    small = build_decoder("unet_digits", image_size=8, channels=1, cond_dim=0, nf=8)
    default = build_decoder("unet_digits", image_size=8, channels=1, cond_dim=0)
    assert small.config.nf == 8 and _n_params(small) < _n_params(default)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['n_f'\].*valid keys.*'nf'"):
        build_decoder("unet_digits", image_size=8, channels=1, cond_dim=0, n_f=8)
    with pytest.raises(ValueError, match="unknown override"):
        build_encoder("digits_cnn", latent_dim=8, image_size=8, channels=1, depth=3)


def test_bad_sizes_are_clear_value_errors():
    with pytest.raises(ValueError, match="image_size must be a positive multiple of .* = 8.*got 36"):
        build_encoder("ncsnpp_cifar10", latent_dim=8, image_size=36, channels=3)
    with pytest.raises(ValueError, match="cond_dim must be >= 0.*got -1"):
        build_decoder("unet_digits", image_size=8, channels=1, cond_dim=-1)
    with pytest.raises(ValueError, match="latent_dim .*100.* multiples of groups=32"):
        build_encoder("resnet50_gn", latent_dim=100, image_size=64, channels=3)
    with pytest.raises(ValueError, match="head_resolutions .* match none"):
        build_encoder("ncsnpp_256", latent_dim=8, image_size=64, channels=3, head_resolutions=(128,))
    with pytest.raises(ValueError, match="fir_kernel must be an even number"):
        build_decoder("unet_digits", image_size=8, channels=1, cond_dim=0, fir=True, fir_kernel=(1, 2, 1))


# ------------------------------------------------------------------ paper-size presets
@pytest.mark.parametrize("kind,name", PAPER_PRESETS)
def test_parameter_count_matches_paper(kind, name):
    paper_m = (PAPER_ENCODERS if kind == "encoder" else PAPER_DECODERS)[name][1]
    model = _model(kind, name)
    count = _n_params(model)
    print(f"\n{kind} {name}: {count:,} parameters (paper {paper_m}M, {count / 1e6 / paper_m - 1:+.1%})")
    if name == "resnet50_gn":
        # The paper's 24.0M cannot be met with the architecture it describes: ResNet-50 without
        # fc is 23.51M and the described head (2048-2048, GN, ReLU, 2048-256, GN) adds 4.72M,
        # 28.23M in all (+17.6%). 24.0M is the backbone plus the last Linear/GN only
        # (23.51M + 0.52M = 24.03M), i.e. the count seemingly leaves the hidden layer out.
        # We build what is described and pin its exact size.
        assert _n_params(model.backbone) == RESNET50_BACKBONE == 23_508_032
        assert _n_params(model.head) == RESNET50_HEAD == 4_723_200
        assert count == 28_231_232
    else:
        assert abs(count / (paper_m * 1e6) - 1) < 0.10


# One Adam step per paper preset. At their paper sizes the two 256px presets cost ~0.4 and
# ~1.6 TFLOP per step at batch 1 (17 s and 39 s on one core); they also step at 64px (the
# same config: FIR, input/output skip, Fourier embedding, attention, heads) for a fast signal.
STEP_CASES = [
    pytest.param("encoder", "ncsnpp_cifar10", {}, id="encoder-ncsnpp_cifar10"),
    pytest.param("encoder", "resnet50_gn", {}, id="encoder-resnet50_gn"),
    # Heads on the five coarsest resolutions, as at 256px (64..4).
    pytest.param("encoder", "ncsnpp_256", {"image_size": 64, "head_resolutions": (16, 8, 4, 2, 1)},
                 id="encoder-ncsnpp_256-at-64px"),
    pytest.param("encoder", "ncsnpp_256", {}, id="encoder-ncsnpp_256", marks=pytest.mark.slow),
    pytest.param("decoder", "ddpmpp_cifar10", {}, id="decoder-ddpmpp_cifar10"),
    pytest.param("decoder", "ncsnpp_256", {"image_size": 64}, id="decoder-ncsnpp_256-at-64px"),
    pytest.param("decoder", "ncsnpp_256", {}, id="decoder-ncsnpp_256", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,name,size", STEP_CASES)
def test_paper_preset_shapes_and_one_adam_step(kind, name, size):
    kwargs = {**(PAPER_ENCODERS if kind == "encoder" else PAPER_DECODERS)[name][0], **size}
    if size:
        torch.manual_seed(0)
        model = (build_encoder if kind == "encoder" else build_decoder)(name, **kwargs)
    else:
        model = _model(kind, name)
    model.train()
    res, ch = kwargs["image_size"], kwargs["channels"]
    b = 1 if name == "ncsnpp_256" else 2
    g = torch.Generator().manual_seed(1)
    images = torch.rand(b, ch, res, res, generator=g) * 2 - 1
    if kind == "encoder":
        inputs, out_shape = (images,), (b, kwargs["latent_dim"])
    else:
        inputs = (images, torch.rand(b, generator=g), torch.randn(b, kwargs["cond_dim"], generator=g))
        out_shape = (b, ch, res, res)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    out = model(*inputs)
    assert out.shape == out_shape and out.dtype == torch.float32
    loss = F.mse_loss(out, torch.randn(out.shape, generator=g))
    assert torch.isfinite(loss)
    loss.backward()
    # Every parameter lies on a path to the output (also those behind near-zero inits).
    grads = dict(model.named_parameters())
    missing = [n for n, p in grads.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in grads.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"
    opt.step()
    # Some gradients are legitimately ~0 at init (attention q/k behind a 1e-10-scaled output
    # projection, key biases, ResNet branches behind zero-init norms); every parameter with
    # a clear gradient must have moved, and all must stay finite.
    frozen = [n for n, p in grads.items() if p.grad.abs().max() > 1e-6 and torch.equal(before[n], p.detach())]
    assert not frozen, f"Adam did not move {frozen[:5]}"
    assert any(p.grad.abs().max() > 1e-6 for p in grads.values())
    assert all(torch.isfinite(p).all() for p in grads.values())
    if kind == "encoder":
        feats = model.features(images[:1])
        assert feats.shape == (1, 2048 if name == "resnet50_gn" else 256) and torch.isfinite(feats).all()
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------- digits presets
def test_digits_encoder_shapes_and_input_checks():
    enc = build_encoder("digits_cnn", latent_dim=16, image_size=8, channels=1)
    n = _n_params(enc)
    print(f"\nencoder digits_cnn: {n:,} parameters")
    assert 10_000 <= n <= 100_000
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert enc(x).shape == (5, 16) and enc(x).dtype == torch.float32
    assert enc.features(x).shape == (5, 96)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 8, 8\), got \(5, 3, 8, 8\)"):
        enc(torch.zeros(5, 3, 8, 8))


def test_decoder_conditioning_contract():
    torch.manual_seed(0)
    dec0 = build_decoder("unet_digits", image_size=8, channels=1, cond_dim=0)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    out = dec0(x, t, None)
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="unconditional .*cond_dim=0.* got cond of shape \\(3, 4\\)"):
        dec0(x, t, torch.zeros(3, 4))

    dec = build_decoder("unet_digits", image_size=8, channels=1, cond_dim=4)
    print(f"\ndecoder unet_digits: {_n_params(dec):,} parameters (cond_dim 4)")
    assert 100_000 <= _n_params(dec) <= 500_000
    with pytest.raises(ValueError, match=r"conditional \(cond_dim=4\) but got cond=None.*\(3, 4\)"):
        dec(x, t)
    with pytest.raises(ValueError, match=r"cond must have shape \(3, 4\), got \(3, 5\)"):
        dec(x, t, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"cond must have shape \(3, 4\), got \(4,\)"):
        dec(x, t, torch.zeros(4))
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        dec(x, torch.rand(3, 1), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 1, 8, 8\), got \(3, 1, 16, 16\)"):
        dec(torch.zeros(3, 1, 16, 16), t, torch.zeros(3, 4))
    # The condition and the time both reach the output.
    c = torch.randn(3, 4)
    assert not torch.equal(dec(x, t, c), dec(x, t, c + 1))
    assert not torch.equal(dec(x, t, c), dec(x, 1 - t, c))


def test_256px_decoder_divides_its_output_by_999_t():
    """The reference's NCSN++ decoder returns h / (999 t) when scale_by_sigma is set
    (lzn/model/ncsnpp.py:522-528 and 672-674 of microsoft/latent-zoning-networks), which its
    AFHQ, CelebA-HQ and LSUN configs do and its CIFAR10 and joint configs do not. ncsnpp_128 (our
    own, for 96-128 px: the reference has no such config) is the 256 px network one level shorter
    and keeps its output scaling."""
    from lzn.models.unet import UNET_PRESETS

    assert {name for name, cfg in UNET_PRESETS.items() if cfg.scale_by_sigma} == {"ncsnpp_256", "ncsnpp_128"}
    assert not UNET_PRESETS["ddpmpp_cifar10"].scale_by_sigma
    small = dict(image_size=64, channels=3, cond_dim=4, nf=8)  # 7 levels need 64 px at least
    torch.manual_seed(0)
    scaled = build_decoder("ncsnpp_256", **small)
    with torch.no_grad():  # the zero-initialised output convs would make every output ~1e-10
        for p in scaled.parameters():
            p.normal_(0.0, 0.05)
    plain = build_decoder("ncsnpp_256", scale_by_sigma=False, **small)
    plain.load_state_dict(scaled.state_dict())
    x, c = torch.randn(4, 3, 64, 64), torch.randn(4, 4)
    t = torch.tensor([1e-3, 0.25, 0.5, 1.0])
    with torch.no_grad():
        h, out = plain(x, t, c), scaled(x, t, c)
    assert h.abs().mean() > 1e-3
    torch.testing.assert_close(out, h / (999.0 * t).view(-1, 1, 1, 1), rtol=1e-5, atol=0.0)


def test_digits_fit_reduces_rf_loss_through_encoder_and_decoder():
    """200 Adam steps on one fixed batch of 16 digits: the decoder, conditioned on the
    encoder's output (as in case study 1, minus the latent flow), lowers the RF loss on a
    fixed set of (t, noise) draws, and the encoder trains through it."""
    torch.manual_seed(0)
    x0 = digits_split().train_images[:16]
    enc = build_encoder("digits_cnn", latent_dim=16, image_size=8, channels=1)
    dec = build_decoder("unet_digits", image_size=8, channels=1, cond_dim=16)
    g = torch.Generator().manual_seed(0)
    t_eval, e_eval = torch.rand(4, 16, generator=g), torch.randn(4, *x0.shape, generator=g)

    def rf_loss(t, e):  # x_t = (1 - t) x0 + t e, velocity dx/dt = e - x0
        tb = t[:, None, None, None]
        return F.mse_loss(dec((1 - tb) * x0 + tb * e, t, enc(x0)), e - x0)

    def eval_loss():
        with torch.no_grad():
            return sum(rf_loss(t, e).item() for t, e in zip(t_eval, e_eval)) / len(t_eval)

    enc_before = [p.detach().clone() for p in enc.parameters()]
    start = eval_loss()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
    for _ in range(200):
        loss = rf_loss(torch.rand(16, generator=g), torch.randn(x0.shape, generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end = eval_loss()
    print(f"\ndigits RF loss on fixed draws: {start:.3f} -> {end:.3f}")
    assert math.isfinite(end) and end < 0.6 * start
    assert all(not torch.equal(a, b) for a, b in zip(enc_before, enc.parameters()))


# ----------------------------------------------------------------------- label anchors
def test_label_anchors():
    torch.manual_seed(0)
    anchors = LabelAnchors(10, 200)
    a = anchors()
    assert a.shape == (10, 200) and a.requires_grad and a is anchors.anchors
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1) < 0.1  # standard normal init
    a.square().sum().backward()
    torch.testing.assert_close(anchors.anchors.grad, 2 * a.detach())
    with pytest.raises(ValueError, match="num_classes must be an int >= 2.*got 1"):
        LabelAnchors(1, 8)
    with pytest.raises(ValueError, match="latent_dim must be an int >= 1.*got 0"):
        LabelAnchors(10, 0)


# ------------------------------------------------- building blocks against brute force
def _upfirdn2d(x, k, up, down, pad0, pad1):
    """Brute-force upfirdn2d (float64): zero-insert `up`, pad, convolve with k, keep every `down`."""
    b, c, h, w = x.shape
    y = x.new_zeros(b, c, h * up, w * up)
    y[:, :, ::up, ::up] = x
    y = F.pad(y, (pad0, pad1, pad0, pad1))
    kh = k.shape[0]
    out = x.new_zeros(b, c, y.shape[2] - kh + 1, y.shape[3] - kh + 1)
    for i in range(kh):
        for j in range(kh):  # true convolution: the kernel is flipped
            out += k[kh - 1 - i, kh - 1 - j] * y[:, :, i:i + out.shape[2], j:j + out.shape[3]]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 5, 3, 2, 1)])
def test_fir_resampling_matches_upfirdn2d(taps):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    k = fir_kernel_2d(taps).double()
    p = k.shape[0] - 2
    torch.testing.assert_close(fir_downsample_2d(x, k), _upfirdn2d(x, k, 1, 2, (p + 1) // 2, p // 2))
    torch.testing.assert_close(fir_upsample_2d(x, k), _upfirdn2d(x, 4 * k, 2, 1, (p + 1) // 2 + 1, p // 2))
    assert fir_upsample_2d(x, k).shape == (2, 3, 16, 16) and fir_downsample_2d(x, k).shape == (2, 3, 4, 4)


def test_self_attention_matches_einsum_reference():
    torch.manual_seed(0)
    attn = SelfAttention2d(16, skip_rescale=True, init_scale=1.0).double()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    h = attn.norm(x)
    q, k, v = attn.q(h), attn.k(h), attn.v(h)
    w = torch.einsum("bchw,bcij->bhwij", q, k) / math.sqrt(16)
    w = torch.softmax(w.reshape(2, 4, 5, 20), dim=-1).reshape(2, 4, 5, 4, 5)
    want = (x + attn.out(torch.einsum("bhwij,bcij->bchw", w, v))) / math.sqrt(2)
    torch.testing.assert_close(attn(x), want)
