"""IS, KID, precision/recall and the vendored Fréchet distance against independent
definitions (torch-fidelity's own functions, scipy, brute-force formulas from the papers),
and the sharded image-set parts against one pass over the whole set."""
import numpy as np
import pytest
import scipy.linalg
import torch

from lzn.metrics import (
    ImageSetPart,
    compare,
    feature_subset,
    gaussian_frechet_distance,
    image_set_part,
    inception_score,
    kernel_inception_distance,
    precision_recall,
    score_sums,
)

fidelity_isc = pytest.importorskip("torch_fidelity.metric_isc")
fidelity_kid = pytest.importorskip("torch_fidelity.metric_kid")
fidelity_prc = pytest.importorskip("torch_fidelity.metric_prc")


def _spd(d, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, 3 * d))
    return a @ a.T / (3 * d)


@pytest.mark.parametrize("d", [1, 5, 32])
def test_vendored_frechet_distance_matches_scipy_sqrtm(d):
    g = np.random.default_rng(d)
    mu1, mu2 = g.normal(size=d), g.normal(size=d)
    s1, s2 = _spd(d, 1), _spd(d, 2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))
    got = gaussian_frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-10)


def test_vendored_frechet_distance_is_torchmetrics_function():
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    if not hasattr(fid_module, "_compute_fid"):
        pytest.skip("this torchmetrics no longer has _compute_fid: the vendored copy is all there is")
    args = [torch.from_numpy(x) for x in (np.ones(6), _spd(6, 3), np.zeros(6), _spd(6, 4))]
    assert float(gaussian_frechet_distance(*args)) == float(fid_module._compute_fid(*args))


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"means \(d,\) and covariances \(d, d\).*\(3,\), \(4, 4\)"):
        gaussian_frechet_distance(torch.zeros(3), torch.eye(4), torch.zeros(3), torch.eye(3))


def _brute_force_is(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """Salimans et al.: exp(mean_x KL(p(y|x) || p(y))) per group of a seeded shuffle, term by term."""
    x = logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n, scores = len(p), []
    for g in range(splits):
        group = p[g * n // splits:(g + 1) * n // splits]
        marginal = group.mean(axis=0)
        kl = [sum(pi[k] * np.log(pi[k] / marginal[k]) for k in range(p.shape[1])) for pi in group]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_torch_fidelity_and_the_definition():
    logits = torch.randn(103, 7, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, splits=10, seed=2020)
    theirs = fidelity_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    assert (mean, std) == pytest.approx(_brute_force_is(logits.numpy(), 10, 2020), rel=1e-10)


def test_inception_score_of_shards_is_that_of_the_whole():
    logits = torch.randn(57, 5, generator=torch.Generator().manual_seed(1))
    whole = inception_score(logits, splits=4)
    parts = [score_sums(logits[lo:hi], torch.arange(lo, hi), 57, splits=4) for lo, hi in ((0, 1), (1, 30), (30, 57))]
    merged = parts[0].merge(parts[1]).merge(parts[2]).score()
    assert merged == pytest.approx(whole, rel=1e-12)
    # Certain, uniformly spread classes score K; one class for all scores 1.
    assert inception_score(torch.eye(5).repeat(4, 1) * 50, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    assert inception_score(torch.zeros(20, 5), splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits=30 for 20 samples"):
        inception_score(torch.zeros(20, 5), splits=30)


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. eq. (unbiased MMD^2, cubic kernel (x.y/d + 1)^3), as explicit double sums."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_torch_fidelity_and_the_definition():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(60, 6, generator=g), torch.randn(45, 6, generator=g) * 1.3 + 0.2
    mean, std = kernel_inception_distance(real, fake, subsets=7, subset_size=20, seed=5)
    theirs = fidelity_kid.kid_features_to_metric(fake, real, kid_subsets=7, kid_subset_size=20, rng_seed=5,
                                                 verbose=False)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)  # theirs: float32
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    x, y = real[:12].double().numpy(), fake[:12].double().numpy()
    one, _ = kernel_inception_distance(real[:12], fake[:12], subsets=1, subset_size=12)  # the whole sets
    assert one == pytest.approx(_brute_force_mmd2(y, x), rel=1e-10)
    with pytest.raises(ValueError, match="subset_size=50 exceeds the samples available"):
        kernel_inception_distance(real, fake, subset_size=50)


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.: inside the union of k-NN balls of the other set, point by point."""
    def radii(a):
        return [sorted(np.linalg.norm(a - a[i], axis=1))[k] for i in range(len(a))]

    def inside(q, centres, r):
        return np.mean([any(np.linalg.norm(q[i] - centres[j]) <= r[j] for j in range(len(centres)))
                        for i in range(len(q))])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_match_torch_fidelity_and_the_definition():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(70, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 4, generator=g, dtype=torch.float64) * 0.6 + 0.7
    got = precision_recall(real, fake, k=3, batch_size=16)
    theirs = fidelity_prc.calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=16)
    assert got == pytest.approx(theirs, abs=1e-6)  # theirs: a float32 mean
    assert got == pytest.approx(_brute_force_precision_recall(real.numpy(), fake.numpy(), 3), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a case that tells the two apart
    assert precision_recall(real, real) == (1.0, 1.0)


class WithLogits(torch.nn.Module):
    """A random extractor of 4x4 grey images with features (B, 6) and logits (B, 5)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 6)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.body(x.flatten(1))

    def features_and_logits(self, x):
        f = self.forward(x)
        return f, self.head(f)


def test_feature_subset_is_a_fixed_seeded_sorted_draw():
    s = feature_subset(1000, 37)
    assert len(s) == 37 and torch.equal(s, s.sort().values) and len(set(s.tolist())) == 37
    assert torch.equal(s, feature_subset(1000, 37)) and not torch.equal(s, feature_subset(1000, 37, seed=1))
    assert torch.equal(feature_subset(10, 50), torch.arange(10))


def test_parts_of_an_image_set_merge_into_the_whole():
    torch.manual_seed(0)
    extractor = WithLogits()
    images = torch.rand(61, 1, 4, 4) * 2 - 1
    subset = feature_subset(61, 25)
    kw = dict(total=61, subset=subset, inception_score=True, is_splits=3, batch_size=7)
    whole = image_set_part(images, extractor, lo=0, **kw)
    parts = [image_set_part(images[lo:hi], extractor, lo=lo, **kw) for lo, hi in ((0, 14), (14, 15), (15, 61))]
    merged = ImageSetPart.merge_all(parts)
    assert torch.equal(merged.subset_index, subset) and torch.equal(whole.subset_index, subset)
    with torch.no_grad():
        features, logits = extractor.features_and_logits(images)
    torch.testing.assert_close(merged.subset_features, features[subset])
    # float32 logits of other batchings differ in the last bits
    assert merged.score.score() == pytest.approx(inception_score(logits, splits=3), rel=1e-6)
    torch.testing.assert_close(merged.moments.stats().cov, whole.moments.stats().cov, rtol=1e-5, atol=1e-7)
    saved = ImageSetPart.from_state_dict(merged.state_dict())
    reference = image_set_part(torch.rand(40, 1, 4, 4) * 2 - 1, extractor, lo=0, total=40,
                               subset=feature_subset(40, 25), inception_score=False)
    assert reference.score is None
    out = compare(reference, saved)
    assert set(out) == {"fid", "is", "is_std", "kid", "kid_std", "kid_subset_size", "precision", "recall"}
    assert out["kid_subset_size"] == 25
    kid, _ = kernel_inception_distance(reference.subset_features, features[subset], subset_size=25)
    assert out["kid"] == pytest.approx(kid, rel=1e-12)
