"""The digits CNN: >= 0.97 test accuracy, trained once and then loaded from its cache,
deterministic, keyed by its settings, and retrained with a warning when the cache is corrupt.
Only the accuracy test trains the full model (a few seconds); cache mechanics use a tiny one."""
import os

import pytest
import torch

import lzn.metrics.digits_classifier as dc
from lzn.data.digits import digits_split
from lzn.metrics import (
    DigitsClassifierConfig,
    classification_accuracy,
    digits_cnn_extractor,
    load_digits_classifier,
    train_digits_classifier,
)

TINY = DigitsClassifierConfig(channels=(4, 4, 8), feature_dim=8, epochs=1)


@pytest.fixture
def count_training(monkeypatch):
    """Counts calls to train_digits_classifier made through the loader."""
    calls = []
    real = dc.train_digits_classifier

    def counting(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(dc, "train_digits_classifier", counting)
    return calls


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_accuracy_features_and_cache_reuse(tmp_path, count_training):
    split = digits_split()
    model = load_digits_classifier(tmp_path)
    assert len(count_training) == 1
    accuracy = classification_accuracy(model, split.test_images, split.test_labels)
    print(f"digits_cnn test accuracy: {accuracy:.4f}")
    assert accuracy >= 0.97

    path = dc.cache_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    again = load_digits_classifier(tmp_path)
    assert len(count_training) == 1  # loaded, not retrained
    assert path.stat().st_mtime_ns == mtime
    assert _same_weights(model, again)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training

    extractor = digits_cnn_extractor(tmp_path)
    assert len(count_training) == 1
    assert extractor.name == "digits_cnn"
    features = extractor(split.test_images[:5])
    assert features.shape == (5, extractor.num_features) == (5, 64)
    torch.testing.assert_close(again.head(features), again(split.test_images[:5]))


def test_training_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = train_digits_classifier(TINY)
    b = train_digits_classifier(TINY)
    assert torch.equal(torch.rand(3), expected)
    assert _same_weights(a, b)
    c = train_digits_classifier(DigitsClassifierConfig(channels=(4, 4, 8), feature_dim=8, epochs=1, seed=1))
    assert not _same_weights(a, c)


def test_cache_key_follows_settings(tmp_path):
    assert dc.cache_path(tmp_path, TINY) == dc.cache_path(tmp_path, DigitsClassifierConfig(
        channels=(4, 4, 8), feature_dim=8, epochs=1))
    for changed in (DigitsClassifierConfig(channels=(4, 4, 8), feature_dim=8, epochs=2),
                    DigitsClassifierConfig(channels=(4, 4, 8), feature_dim=8, epochs=1, lr=1e-3),
                    DigitsClassifierConfig(channels=(4, 8, 8), feature_dim=8, epochs=1)):
        assert dc.cache_path(tmp_path, changed) != dc.cache_path(tmp_path, TINY)


def test_cache_dir_from_environment(tmp_path, monkeypatch, count_training):
    monkeypatch.setenv("LZN_CACHE_DIR", str(tmp_path / "env"))
    load_digits_classifier(config=TINY)
    assert (tmp_path / "env" / dc.cache_path(None, TINY).name).is_file()
    monkeypatch.delenv("LZN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dc.resolve_cache_dir() == tmp_path / "home" / ".cache" / "lzn"
    assert dc.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "other_key"])
def test_corrupt_cache_is_retrained_with_a_warning(tmp_path, count_training, corruption):
    path = dc.cache_path(tmp_path, TINY)
    good = load_digits_classifier(tmp_path, config=TINY)
    assert len(count_training) == 1
    if corruption == "garbage":
        path.write_bytes(b"\x00not a torch file")
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable file whose key does not match (e.g. copied from another config)
        torch.save({"key": "0" * 64, "state_dict": good.state_dict()}, path)

    with pytest.warns(RuntimeWarning, match=f"digits classifier cache {path} could not be loaded"):
        retrained = load_digits_classifier(tmp_path, config=TINY)
    assert len(count_training) == 2
    assert _same_weights(good, retrained)  # deterministic retraining
    payload = torch.load(path, weights_only=True)  # the file was replaced by a good one
    assert payload["key"] == dc.cache_key(TINY)
    load_digits_classifier(tmp_path, config=TINY)
    assert len(count_training) == 2
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_bad_config_raises():
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        DigitsClassifierConfig(epochs=0)
    with pytest.raises(ValueError, match="channels must be three positive ints"):
        DigitsClassifierConfig(channels=(4, 4))


def test_bad_image_shape_raises():
    model = train_digits_classifier(TINY)
    with pytest.raises(ValueError, match="\\(B, 1, 8, 8\\), got \\(2, 3, 8, 8\\)"):
        model(torch.zeros(2, 3, 8, 8))
