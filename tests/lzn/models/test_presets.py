"""model=auto: the preset sized from data.image_size (lzn.models.presets), built and run."""
import pytest
import torch

from lzn.errors import UserError
from lzn.models import build_decoder, build_encoder
from lzn.models.presets import preset_for, valid_sizes


def test_the_valid_sizes_are_what_each_band_halves_to():
    assert valid_sizes() == [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128, 192, 256]


@pytest.mark.parametrize("size, nearest", [(25, "24 or 28"), (6, "8 or 12"), (100, "96 or 128"), (300, "192 or 256")])
def test_a_size_no_preset_builds_is_refused_naming_the_nearest(size, nearest):
    with pytest.raises(UserError, match=rf"data.image_size={size} .*Nearest: {nearest}"):
        preset_for(size)


@pytest.mark.parametrize("size", [8, 12, 16, 20, 24, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_tiny_preset_builds_and_runs_at_every_size_up_to_32(size, channels):
    p = preset_for(size)
    assert (p.encoder, p.decoder) == ("ncsnpp_tiny", "unet_tiny")
    torch.manual_seed(0)
    encoder = build_encoder(p.encoder, latent_dim=16, image_size=size, channels=channels, **p.encoder_overrides)
    decoder = build_decoder(p.decoder, image_size=size, channels=channels, cond_dim=16, **p.decoder_overrides)
    x = torch.randn(2, channels, size, size)
    z = encoder(x)
    assert z.shape == (2, 16) and decoder(x, torch.rand(2), z).shape == x.shape
    # CPU-sized: under 1M parameters in the encoder, 1.5M in the decoder (3 channels, q = 16).
    assert sum(q.numel() for q in encoder.parameters()) < 1e6 and sum(q.numel() for q in decoder.parameters()) < 1.5e6
    assert preset_for(size, decoder=False).encoder == "ncsnpp_tiny"


@pytest.mark.parametrize("size, encoder, decoder", [
    (40, "ncsnpp_cifar10", "ddpmpp_cifar10"), (64, "ncsnpp_cifar10", "ddpmpp_cifar10"),
    (96, "ncsnpp_128", "ncsnpp_128"), (128, "ncsnpp_128", "ncsnpp_128"),
    (192, "ncsnpp_256", "ncsnpp_256"), (256, "ncsnpp_256", "ncsnpp_256")])
def test_larger_sizes_take_the_papers_networks_with_attention_and_heads_in_place(size, encoder, decoder):
    p = preset_for(size)
    assert (p.encoder, p.decoder) == (encoder, decoder)
    assert preset_for(size, decoder=False).encoder == "resnet50_gn"
    # Built narrow (nf 8, 1-channel heads) to keep the test small: the levels, attention and
    # heads are the preset's.
    narrow = dict(nf=8, head_channels=1, head_hidden=8)
    enc = build_encoder(p.encoder, latent_dim=8, image_size=size, channels=3, **{**p.encoder_overrides, **narrow})
    dec = build_decoder(p.decoder, image_size=size, channels=3, cond_dim=8, **{**p.decoder_overrides, "nf": 8})
    resolutions = set(enc.down.skip_resolutions)
    assert set(p.decoder_overrides["attn_resolutions"]) <= resolutions and min(resolutions) >= 3
    maps = [*enc.down.skip_resolutions, enc.down.skip_resolutions[-1]]  # the skips, then the middle block
    assert len(enc.heads) > 0 and size not in {maps[i] for i in enc.head_maps}
    assert any(not isinstance(a, torch.nn.Identity) for a in dec.up_attns)
