"""The linear probe: near-perfect on separable features, >= 0.95 on raw digits pixels, chance
on random labels, deterministic per seed; linear_probe_eval embeds in batches without grad."""
import pytest
import torch

from lzn.data.digits import digits_split
from lzn.metrics import linear_probe, linear_probe_eval


@pytest.fixture(autouse=True)
def one_thread():
    # A linear layer on 64-d features is faster on one thread, and much faster than two
    # threads when other processes share the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(n_per_class, num_classes=10, dim=32, spread=0.5, seed=0):
    """Gaussian clusters around scaled one-hot means: linearly separable with a wide margin."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(n_per_class)
    means = 4.0 * torch.eye(num_classes, dim)
    features = means[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    return features, labels


def test_separable_features_give_perfect_top1():
    # With the paper's defaults (AdamW lr 3e-4 from zero, 300 epochs); 2000 samples give
    # 2400 steps, enough for Adam's equal-sized early steps on the 22 noise dimensions to
    # be outgrown by the 10 informative ones.
    train_x, train_y = _clusters(200, seed=0)
    test_x, test_y = _clusters(50, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert set(result) == {"top1", "top5"}
    assert result["top1"] >= 0.995
    assert result["top5"] == 1.0


def test_random_labels_give_chance_accuracy():
    # The probe can fail: with labels independent of the features it must not beat chance.
    train_x, _ = _clusters(50, seed=0)
    test_x, _ = _clusters(20, seed=1)
    g = torch.Generator().manual_seed(3)
    train_y = torch.randint(0, 10, (train_x.shape[0],), generator=g)
    test_y = torch.randint(0, 10, (test_x.shape[0],), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=100)
    assert result["top1"] < 0.2
    assert result["top1"] <= result["top5"] < 0.75


def test_raw_digit_pixels():
    split = digits_split()
    seen = []

    def embed(images):
        assert not torch.is_grad_enabled()
        seen.append(images.shape[0])
        return images.flatten(1)

    # 300 epochs of 1257 images are only 1500 AdamW steps, too few for lr 3e-4 (top-1 0.93),
    # so the digits probe uses a larger rate.
    result = linear_probe_eval(embed, split.train_images, split.train_labels, split.test_images,
                               split.test_labels, batch_size=500, lr=3e-3)
    assert result["top1"] >= 0.95
    assert result["top5"] >= 0.99
    assert seen == [500, 500, 257, 500, 40]  # train then test, in batches of at most 500


def test_deterministic_per_seed():
    train_x, train_y = _clusters(20, spread=3.0, seed=0)  # overlapping classes: order matters
    test_x, test_y = _clusters(20, spread=3.0, seed=1)
    kw = dict(epochs=20, batch_size=16)
    a = linear_probe(train_x, train_y, test_x, test_y, seed=0, **kw)
    b = linear_probe(train_x, train_y, test_x, test_y, seed=0, **kw)
    assert a == b


def test_top5_with_fewer_than_five_classes_is_one():
    train_x, train_y = _clusters(30, num_classes=3, dim=8, spread=2.0)
    test_x, test_y = _clusters(10, num_classes=3, dim=8, spread=2.0, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=20)
    assert result["top5"] == 1.0
    assert 0.5 < result["top1"] <= 1.0


def test_standardisation_makes_scale_irrelevant():
    train_x, train_y = _clusters(30)
    test_x, test_y = _clusters(10, seed=1)
    kw = dict(epochs=30)
    base = linear_probe(train_x, train_y, test_x, test_y, **kw)
    scaled = linear_probe(train_x * 1e3 + 5.0, train_y, test_x * 1e3 + 5.0, test_y, **kw)
    assert scaled["top1"] == pytest.approx(base["top1"], abs=1e-6)


def test_bad_input_raises():
    x, y = _clusters(5)
    with pytest.raises(ValueError, match="same width, got 32 and 31"):
        linear_probe(x, y, x[:, :31], y)
    with pytest.raises(ValueError, match="train_labels must be an integer tensor"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="test_features contains NaN"):
        linear_probe(x, y, torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="embed must return features of shape \\(B, d\\)"):
        linear_probe_eval(lambda im: im, torch.zeros(4, 1, 2, 2), y[:4], torch.zeros(4, 1, 2, 2), y[:4])
