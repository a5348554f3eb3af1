"""FID: equal to a plain numpy/scipy Fréchet distance, ~0 for a set against itself, growing
with the noise added to a copy, cached statistics reusable through torch.save, and the
Inception extractor loads pytorch-fid's weight layout but never downloads."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lzn.data.digits import digits_split
from lzn.metrics import FeatureStats, feature_stats, fid, fid_from_stats, frechet_distance, inception_extractor
from lzn.metrics.fid import INCEPTION_WEIGHTS_FILENAMES, INCEPTION_WEIGHTS_URL

F64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True)
def one_thread():
    # Small matrices: one thread is faster, and far faster than two on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Flatten(nn.Module):
    """Images (N, d, 1, 1) -> features (N, d): lets a test choose the features directly."""

    name = "flatten"

    def forward(self, x):
        return x.flatten(1)


def _random_conv(seed=0):
    """A fixed random conv net on (B, 1, 8, 8) images -> (B, 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 8, 3, stride=2),
                            nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    net.name = "random_conv"
    return net


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula, in float64, with scipy's matrix square root."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [4, 24])
def test_matches_scipy_frechet_distance_on_random_features(dim):
    g = torch.Generator().manual_seed(dim)
    real = torch.randn(400, dim, generator=g, **F64) @ torch.randn(dim, dim, generator=g, **F64)
    fake = 0.7 * torch.randn(300, dim, generator=g, **F64) @ torch.randn(dim, dim, generator=g, **F64) + 0.5
    expected = _scipy_frechet(real.numpy(), fake.numpy())
    ours = fid(real[:, :, None, None], fake[:, :, None, None], Flatten(), batch_size=64)
    assert ours == pytest.approx(expected, rel=1e-3)

    stats = feature_stats(real[:, :, None, None], Flatten(), batch_size=37)
    np.testing.assert_allclose(stats.mean.numpy(), real.numpy().mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(real.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.num_samples == 400 and stats.extractor == "flatten"


def test_large_common_offset_keeps_covariance_exact():
    # Features far from the origin: a naive sum(f f^T) - n mu mu^T would lose the covariance.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) * 1e-3 + 1e6
    stats = feature_stats(x[:, :, None, None], Flatten(), batch_size=100)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-6)


def test_self_distance_is_zero_and_noise_increases_it():
    images = digits_split().train_images[:600]
    extractor = _random_conv()
    stats = feature_stats(images, extractor)
    # This extractor's features have total variance ~0.15, so distances are small numbers.
    assert frechet_distance(stats, stats) < 1e-10
    assert fid(images, images.clone(), extractor) < 1e-10

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    values = [fid_from_stats(stats, images + sigma * noise, extractor) for sigma in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert values[0] > 1e-6
    assert all(2 * a < b for a, b in zip(values, values[1:])), values  # roughly quadratic in sigma
    assert fid_from_stats(stats, images + 0.3, extractor) > values[-2]


def test_stats_survive_torch_save_with_weights_only(tmp_path):
    images = digits_split().train_images[:300]
    extractor = _random_conv()
    stats = feature_stats(images, extractor)
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    loaded = FeatureStats.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    fake = images.flip(-1)
    assert fid_from_stats(loaded, fake, extractor) == fid_from_stats(stats, fake, extractor)
    assert fid(images, fake, extractor) == pytest.approx(fid_from_stats(loaded, fake, extractor), rel=1e-12)


def test_iterable_of_batches_equals_tensor():
    images = digits_split().train_images[:250]
    extractor = _random_conv()
    whole = feature_stats(images, extractor, batch_size=1000)
    streamed = feature_stats((b for b in images.split(33)), extractor)
    torch.testing.assert_close(streamed.mean, whole.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(streamed.cov, whole.cov, rtol=0, atol=1e-12)
    assert streamed.num_samples == 250


def test_extractor_mode_is_restored():
    extractor = _random_conv().train()
    feature_stats(digits_split().train_images[:10], extractor)
    assert extractor.training


def test_bad_input_raises():
    extractor = _random_conv()
    images = digits_split().train_images[:20]
    with pytest.raises(ValueError, match="at least 2 image"):
        feature_stats(images[:1], extractor)
    with pytest.raises(ValueError, match="shape \\(N, C, H, W\\)"):
        feature_stats(images[:, 0], extractor)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        feature_stats(images, extractor, batch_size=0)
    with pytest.raises(ValueError, match="must map \\(B, C, H, W\\) to \\(B, d\\)"):
        feature_stats(images, nn.Identity())
    with pytest.raises(ValueError, match="NaN/Inf features"):
        feature_stats(torch.full_like(images, float("nan")), extractor)
    stats = feature_stats(images, extractor)
    with pytest.raises(ValueError, match="computed with extractor 'random_conv'.*'flatten'"):
        fid_from_stats(stats, images, Flatten())
    other = FeatureStats(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 5, "random_conv")
    with pytest.raises(ValueError, match="different feature spaces"):
        frechet_distance(stats, other)


def test_inception_without_weights_raises_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("inception_extractor tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(FileNotFoundError) as info:
        inception_extractor()
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAMES[0]) in message
    assert INCEPTION_WEIGHTS_URL in message
    with pytest.raises(FileNotFoundError, match="weights_path='/nonexistent/inception.pth'"):
        inception_extractor("/nonexistent/inception.pth")


def test_inception_loads_pytorch_fid_layout_from_hub_cache(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="the FID Inception-v3 comes with torch-fidelity")
    from torchvision.models.inception import Inception3

    # Random weights in the layout of pytorch-fid's pt_inception file (torchvision's Inception3
    # with 1008 classes and no aux head): checks the loading path without the real 95 MB file.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / INCEPTION_WEIGHTS_FILENAMES[0])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    extractor = inception_extractor()
    assert extractor.name == "inception_v3" and extractor.num_features == 2048
    torch.testing.assert_close(extractor.net.fc.weight, state["fc.weight"])
    gray = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        f_gray = extractor(gray)
        f_rgb = extractor(gray.expand(-1, 3, -1, -1))
    assert f_gray.shape == (2, 2048) and torch.isfinite(f_gray).all()
    torch.testing.assert_close(f_gray, f_rgb)  # grey images are repeated to RGB
    with torch.no_grad():
        features, logits = extractor.features_and_logits(gray)
    torch.testing.assert_close(features, f_gray)  # one pass gives both
    # The Inception Score's logits: torch-fidelity's logits_unbiased, the fc layer without its bias.
    torch.testing.assert_close(logits, features @ state["fc.weight"].T, rtol=1e-4, atol=1e-4)

    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        inception_extractor(tmp_path / "bad.pth")
