"""The linear probe: near-perfect on separable features, >= 0.95 on raw digits pixels, chance
on random labels, deterministic per seed, raw features unless standardised (the reference's
protocol); linear_probe_eval embeds in batches without grad."""
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
                               split.test_labels, batch_size=500, lr=3e-3, standardize=True)
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
    base = linear_probe(train_x, train_y, test_x, test_y, standardize=True, **kw)
    scaled = linear_probe(train_x * 1e3 + 5.0, train_y, test_x * 1e3 + 5.0, test_y, standardize=True, **kw)
    assert scaled["top1"] == pytest.approx(base["top1"], abs=1e-6)


ADAM_EPS = 1e-8  # torch.optim.AdamW's default
TIE = 1e-6  # logits closer than this may come out in either order in float32 (they are ~1e-2 here)


def _one_adam_step_accuracy(train_x, train_y, test_x, test_y, lr, num_classes):
    """Top-1/top-5 after one full-batch AdamW step from a zero layer, from Adam's definition,
    and the share of test samples a near-tie leaves open. The bias-corrected first step is
    lr * g / (|g| + eps). At zero the softmax is uniform and dL/dW = (1/N) sum_i (1/K -
    onehot(y_i)) x_i^T. The step is about -lr sign(g) in every entry, so two classes whose
    gradients share their signs get logits equal up to rounding: a test sample whose top-1 or
    5th/6th logits are within TIE counts as either."""
    x, t = train_x.double(), test_x.double()
    residual = 1.0 / num_classes - torch.nn.functional.one_hot(train_y, num_classes).double()
    grad_w, grad_b = residual.T @ x / len(x), residual.mean(dim=0)
    # A float32 gradient that is zero but for rounding has no sign to follow: none may be near 0.
    assert min(grad_w.abs().min(), grad_b.abs().min()) > 1e2 * ADAM_EPS
    logits = t @ (-lr * grad_w / (grad_w.abs() + ADAM_EPS)).T - lr * grad_b / (grad_b.abs() + ADAM_EPS)
    order = logits.sort(dim=1, descending=True)
    top5 = order.indices[:, :5]
    gaps = order.values[:, :-1] - order.values[:, 1:]
    open_ = ((gaps[:, 0] < TIE) | (gaps[:, 4] < TIE)).double().mean().item()
    return (top5[:, 0] == test_y).double().mean().item(), (top5 == test_y[:, None]).any(dim=1).double().mean().item(), \
        open_


@pytest.mark.parametrize("standardize", [False, True])
def test_features_are_raw_unless_standardised(standardize):
    # The reference's probe feeds raw features; one AdamW step tells which features it saw.
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(300, 6, generator=g) * 3 + 2, torch.randn(200, 6, generator=g) * 3 + 2
    w = torch.randn(6, 10, generator=g)
    train_y, test_y = (train_x @ w).argmax(1), (test_x @ w).argmax(1)
    assert train_y.bincount(minlength=10).min() > 0  # an absent class's gradient would be all rounding
    mean, std = train_x.mean(0), train_x.std(0)
    raw = _one_adam_step_accuracy(train_x, train_y, test_x, test_y, 1e-3, 10)
    standardised = _one_adam_step_accuracy((train_x - mean) / std, train_y, (test_x - mean) / std, test_y, 1e-3, 10)
    (top1, top5, open_), (other, _, other_open) = (standardised, raw) if standardize else (raw, standardised)
    assert open_ <= 0.05  # near-ties leave at most 10 of the 200 samples open
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=1, lr=1e-3, batch_size=300, standardize=standardize)
    assert abs(result["top1"] - top1) <= open_ + 1e-6 and abs(result["top5"] - top5) <= open_ + 1e-6, (result, top1,
                                                                                                       top5, open_)
    assert abs(other - top1) > open_ + other_open  # the two protocols are distinguishable on these features


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


@pytest.mark.parametrize("progress", [True, False])
def test_the_epoch_bar_is_drawn_only_with_progress(monkeypatch, progress):
    # A sweep trial's evaluation passes progress=False: no bar may appear among Tune's table.
    from lzn.metrics import probe

    bars = []
    monkeypatch.setattr(probe, "tqdm", lambda iterable, **kw: bars.append(kw) or iterable)
    train_x, train_y = _clusters(4)
    plain = linear_probe(train_x, train_y, train_x, train_y, epochs=3, progress=progress)
    assert [kw["desc"] for kw in bars] == (["linear probe"] if progress else [])
    monkeypatch.undo()
    assert plain == linear_probe(train_x, train_y, train_x, train_y, epochs=3)  # the bar changes nothing else
