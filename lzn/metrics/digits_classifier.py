"""The digits CNN: a small classifier that plays Inception's role for the 8x8 digits tasks.

Trained once on the digits *training* split (`lzn.data.digits.digits_split()`), seeded,
and cached on disk, it serves two metrics: its penultimate features are the FID feature
extractor for digits (reported as "digits_cnn"), and its predictions label generated
samples for the class-consistency metric (`conditional_accuracy`). Training takes a few
seconds on two CPU cores.

The cache file is keyed by a hash of the architecture (the module's printed structure),
the training settings and the data split, so changing any of them trains a new model
instead of loading a stale one. Files are written to a temporary file and moved into
place with `os.replace`, so concurrent workers never read a half-written file; a cache
file that cannot be loaded (truncated, corrupt, or not ours) is retrained and replaced
with a RuntimeWarning naming the file and the error.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lzn.checkpoint import save_atomically
from lzn.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_split

DIGITS_CNN_NAME = "digits_cnn"
NUM_DIGIT_CLASSES = 10
# Bump when the training code changes in a way the config and architecture do not show.
_CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Architecture and training settings; every field is part of the cache key."""

    channels: tuple[int, int, int] = (32, 64, 64)
    feature_dim: int = 64  # width of the penultimate layer = FID feature dimension
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation by up to this many pixels, the only augmentation
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"channels must be three positive ints, got {self.channels!r}")
        for name in ("feature_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.max_shift < 8:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0 and 0 <= max_shift < 8, got lr={self.lr!r}, "
                f"weight_decay={self.weight_decay!r}, max_shift={self.max_shift!r}"
            )


class DigitsCNN(nn.Module):
    """Conv net for (B, 1, 8, 8) images in [-1, 1]: `forward` gives logits (B, 10),
    `features` the penultimate activations (B, feature_dim)."""

    def __init__(self, config: DigitsClassifierConfig = DigitsClassifierConfig()) -> None:
        super().__init__()
        c1, c2, c3 = config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4 * 4, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, NUM_DIGIT_CLASSES)
        self.num_features = config.feature_dim

    def features(self, images: Tensor) -> Tensor:
        """images (B, 1, 8, 8) -> penultimate features (B, feature_dim)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsCNN expects images of shape (B, 1, 8, 8), got {tuple(images.shape)}")
        return self.embed(self.conv(images))

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 1, 8, 8) -> logits (B, 10)."""
        return self.head(self.features(images))


class DigitsCNNFeatures(nn.Module):
    """The FID feature extractor for digits: images (B, 1, 8, 8) in [-1, 1] -> (B, feature_dim)."""

    name = DIGITS_CNN_NAME

    def __init__(self, cnn: DigitsCNN) -> None:
        super().__init__()
        self.cnn = cnn
        self.num_features = cnn.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.cnn.features(images)

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(features (B, feature_dim), digit logits (B, 10)): the logits give a digits Inception Score."""
        features = self.cnn.features(images)
        return features, self.cnn.head(features)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir` if given, else $LZN_CACHE_DIR, else ~/.cache/lzn."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LZN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lzn"


def cache_key(config: DigitsClassifierConfig = DigitsClassifierConfig()) -> str:
    """Hex digest identifying the trained weights: architecture, training settings and data split."""
    description = {
        "format": _CACHE_FORMAT_VERSION,
        "architecture": str(DigitsCNN(config)),
        "training": asdict(config),
        "split": {"seed": DIGITS_SPLIT_SEED, "test_fraction": DIGITS_TEST_FRACTION},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cache_path(
    cache_dir: str | os.PathLike | None = None, config: DigitsClassifierConfig = DigitsClassifierConfig()
) -> Path:
    """Where the weights for `config` live: <cache dir>/digits_cnn-<first 16 hex digits of the key>.pt."""
    return resolve_cache_dir(cache_dir) / f"{DIGITS_CNN_NAME}-{cache_key(config)[:16]}.pt"


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, 1, H, W) by a random integer offset in [-max_shift, max_shift]^2,
    filling with the background value -1 (digits are drawn on a blank page). Written out
    because torchvision's random transforms draw from the global RNG, not `generator`."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_digits_classifier(config: DigitsClassifierConfig = DigitsClassifierConfig()) -> DigitsCNN:
    """Train a DigitsCNN on the digits training split; deterministic given `config.seed`.

    Uses its own generator and a forked global RNG, so it neither depends on nor disturbs
    the caller's random state. Returns the model in eval mode with gradients off.
    """
    split = digits_split()
    threads = torch.get_num_threads()
    # One intra-op thread: batches of 64 8x8 images gain nothing from more, and on a shared
    # machine spinning OpenMP threads made training 5-10x slower than a single thread.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = DigitsCNN(config)
        _fit(model, split.train_images, split.train_labels, config)
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


def _fit(model: DigitsCNN, images: Tensor, labels: Tensor, config: DigitsClassifierConfig) -> None:
    """AdamW with a cosine schedule over seeded shuffles; images (N, 1, 8, 8), labels (N,)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-images.shape[0] // config.batch_size)
    # Cosine decay to zero: the last epochs settle the weights, so accuracy does not hinge on
    # where the final noisy step lands.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for idx in torch.split(order, config.batch_size):
            x = _shift(images[idx], config.max_shift, generator)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def _load_cached(path: Path, key: str, config: DigitsClassifierConfig) -> DigitsCNN:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("key") != key:
        raise ValueError(f"expected a dict with key {key[:16]}..., got {type(payload).__name__} "
                         f"with key {payload.get('key') if isinstance(payload, dict) else None!r}")
    model = DigitsCNN(config)
    model.load_state_dict(payload["state_dict"])  # strict: a missing or extra tensor is corruption
    return model.eval().requires_grad_(False)


def load_digits_classifier(
    cache_dir: str | os.PathLike | None = None, *, config: DigitsClassifierConfig = DigitsClassifierConfig()
) -> DigitsCNN:
    """The trained digits CNN (CPU, eval mode, gradients off), from the cache or trained now.

    cache_dir: where the weights live (default: $LZN_CACHE_DIR, else ~/.cache/lzn). A missing
    file is trained and written; an unreadable one is retrained with a RuntimeWarning.
    """
    path = cache_path(cache_dir, config)
    key = cache_key(config)
    if path.exists():
        try:
            return _load_cached(path, key, config)
        except Exception as err:  # any failure to read a derived file means: rebuild it
            warnings.warn(
                f"digits classifier cache {path} could not be loaded ({type(err).__name__}: {err}); "
                "retraining and replacing it",
                RuntimeWarning,
                stacklevel=2,
            )
    model = train_digits_classifier(config)
    save_atomically({"key": key, "config": asdict(config), "state_dict": model.state_dict()}, path)
    return model


def digits_cnn_extractor(
    cache_dir: str | os.PathLike | None = None, *, config: DigitsClassifierConfig = DigitsClassifierConfig()
) -> DigitsCNNFeatures:
    """The "digits_cnn" FID extractor: (B, 1, 8, 8) in [-1, 1] -> penultimate features (B, feature_dim)."""
    return DigitsCNNFeatures(load_digits_classifier(cache_dir, config=config))
