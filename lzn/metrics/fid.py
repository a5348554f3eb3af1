"""Fréchet distance between image sets in the feature space of a pluggable extractor.

FID fits a Gaussian (mean, covariance) to the features of each image set and reports
||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)). The distance itself is
torchmetrics' (`_compute_fid`, the function its `FrechetInceptionDistance.compute` calls:
the trace of the matrix square root from the eigenvalues of S_r S_f, in float64), vendored
in `lzn.metrics.frechet`. This module adds what the evaluation stage needs
around it: any extractor (an nn.Module mapping images (B, C, H, W) in [-1, 1] to (B, d)),
streaming statistics so 50k samples never sit in memory as features, and `FeatureStats`
that can be saved and reused, because the real set's statistics are computed once per
dataset and extractor and cached.

Extractors: `inception_extractor()` (the standard FID Inception-v3, reported as
"inception_v3") and `lzn.metrics.digits_classifier.digits_cnn_extractor()` ("digits_cnn").
Everything here is per process: with sharded evaluation, gather the images or merge
sufficient statistics before calling `frechet_distance`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from lzn.errors import UserError
from lzn.metrics.classification import check_batch_size, check_images
from lzn.metrics.frechet import gaussian_frechet_distance

# A tensor (N, C, H, W) is split into batches; an iterable yields (B, C, H, W) batches, so a
# sampler can stream 50k generated images without holding them all.
Images = Union[Tensor, Iterable[Tensor]]

INCEPTION_NAME = "inception_v3"
# pytorch-fid's conversion of the TensorFlow FID graph (inception-2015-12-05); torch-fidelity
# ships the same network under the second name. Both load into torchmetrics' Inception.
INCEPTION_WEIGHTS_FILENAMES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


def extractor_name(extractor: nn.Module) -> str:
    """The name metrics are reported under: the extractor's `name` attribute, else its class name."""
    return str(getattr(extractor, "name", type(extractor).__name__))


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of one image set's features: mean (d,), cov (d, d), float64, CPU.

    `extractor` names the feature space, so statistics of one extractor are never compared
    with another's. `state_dict()` holds tensors, ints and strings only, so a cache file
    loads with `torch.load(path, weights_only=True)` and `FeatureStats.from_state_dict`.
    """

    mean: Tensor
    cov: Tensor
    num_samples: int
    extractor: str

    def __post_init__(self) -> None:
        d = self.mean.shape[0] if self.mean.dim() == 1 else -1
        if self.mean.dim() != 1 or tuple(self.cov.shape) != (d, d):
            raise ValueError(
                f"FeatureStats needs mean (d,) and cov (d, d), got {tuple(self.mean.shape)} and {tuple(self.cov.shape)}"
            )
        if self.num_samples < 2:
            raise ValueError(f"FeatureStats needs at least 2 samples for a covariance, got {self.num_samples}")

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def state_dict(self) -> dict:
        return {"mean": self.mean, "cov": self.cov, "num_samples": self.num_samples, "extractor": self.extractor}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        missing = {"mean", "cov", "num_samples", "extractor"} - set(state)
        if missing:
            raise ValueError(f"FeatureStats state is missing {sorted(missing)}; got keys {sorted(state)}")
        return cls(
            mean=state["mean"].to("cpu", torch.float64),
            cov=state["cov"].to("cpu", torch.float64),
            num_samples=int(state["num_samples"]),
            extractor=str(state["extractor"]),
        )


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def merge_in_order(parts: Iterable, what: str):
    """Left fold of `.merge` over `parts` in the order given (the caller fixes it: shard order),
    so one sharding of a set always merges to the same numbers."""
    merged = None
    for part in parts:
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise ValueError(f"no {what} to merge")
    return merged


@dataclass(frozen=True)
class FeatureMoments:
    """Sufficient statistics of a part of an image set: count, mean (d,) and the centred sum
    of outer products m2 (d, d), float64 on the CPU. Parts computed anywhere (one per
    evaluation shard) merge exactly into the statistics of the whole (Chan et al.'s pairwise
    update), and merging the same parts in the same order gives bit-identical results, so the
    statistics of N images do not depend on how many workers computed their parts."""

    num_samples: int
    mean: Tensor
    m2: Tensor
    extractor: str

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        if other.extractor != self.extractor or other.mean.shape != self.mean.shape:
            raise ValueError(f"cannot merge moments of {self.extractor} (d={self.mean.shape[0]}) with "
                             f"{other.extractor} (d={other.mean.shape[0]})")
        n = self.num_samples + other.num_samples
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.num_samples / n)
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (self.num_samples * other.num_samples / n)
        return FeatureMoments(n, mean, m2, self.extractor)

    @classmethod
    def merge_all(cls, parts: Iterable["FeatureMoments"]) -> "FeatureMoments":
        return merge_in_order(parts, "feature moments")

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance (divides by N - 1, as torchmetrics and pytorch-fid)."""
        if self.num_samples < 2:
            raise ValueError(f"feature statistics need at least 2 images for a covariance, got {self.num_samples}")
        return FeatureStats(self.mean, self.m2 / (self.num_samples - 1), self.num_samples, self.extractor)

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "mean": self.mean, "m2": self.m2, "extractor": self.extractor}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureMoments":
        return cls(int(state["num_samples"]), state["mean"].to("cpu", torch.float64),
                   state["m2"].to("cpu", torch.float64), str(state["extractor"]))


def has_logits(extractor: nn.Module) -> bool:
    """Whether `extractor` also gives class logits (`features_and_logits`), as the Inception
    Score needs: Inception-v3 (its 1008 ImageNet classes) and the digits CNN (10 digits)."""
    return callable(getattr(extractor, "features_and_logits", None))


@torch.no_grad()
def extract_batches(images: Images, extractor: nn.Module, *, batch_size: int = 256,
                    logits: bool = False) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """Yields (features (B, d), logits (B, K) or None) per batch, checked, on the extractor's device.

    images: (N, C, H, W) in [-1, 1], split into `batch_size` batches, or an iterable of
    (B, C, H, W) batches (then `batch_size` is unused). The extractor runs in eval mode (its
    previous mode is restored). logits: also the class logits, from the same forward pass
    (the extractor must have `features_and_logits`).
    """
    check_batch_size(batch_size)
    if logits and not has_logits(extractor):
        raise ValueError(f"extractor {extractor_name(extractor)} gives no class logits (no features_and_logits)")
    if isinstance(images, Tensor):
        check_images(images)
        images = torch.split(images, batch_size)
    device = _module_device(extractor)
    was_training = extractor.training
    extractor.eval()
    width = None
    try:
        for x in images:
            check_images(x, name="image batch")
            f, y = extractor.features_and_logits(x.to(device)) if logits else (extractor(x.to(device)), None)
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(
                    f"extractor {extractor_name(extractor)} must map (B, C, H, W) to (B, d); for B={x.shape[0]} "
                    f"it returned shape {tuple(f.shape)}"
                )
            if not torch.isfinite(f).all() or (y is not None and not torch.isfinite(y).all()):
                raise ValueError(
                    f"extractor {extractor_name(extractor)} returned NaN/Inf features; "
                    "are the images finite and in [-1, 1]?"
                )
            if width is not None and f.shape[1] != width:
                raise ValueError(f"extractor feature width changed between batches: {width} then {f.shape[1]}")
            width = f.shape[1]
            yield f, y
    finally:
        extractor.train(was_training)


class MomentAccumulator:
    """Streams feature batches (B, d) into `FeatureMoments`, in float64."""

    def __init__(self) -> None:
        self.n, self.shift, self.total, self.outer = 0, None, None, None

    def add(self, features: Tensor) -> None:
        f = features.double()
        if self.shift is None:
            # Accumulating around the first batch's mean instead of 0 avoids the cancellation
            # in sum(f f^T) - n mu mu^T when features have a large common offset.
            self.shift = f.mean(dim=0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        centred = f - self.shift
        self.total += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.n += f.shape[0]

    def moments(self, extractor: str) -> FeatureMoments:
        if self.n < 1:
            raise ValueError("feature_moments got no images")
        mean_centred = self.total / self.n
        m2 = self.outer - self.n * torch.outer(mean_centred, mean_centred)
        return FeatureMoments(self.n, (self.shift + mean_centred).cpu(), m2.cpu(), extractor)


def feature_moments(images: Images, extractor: nn.Module, *, batch_size: int = 256) -> FeatureMoments:
    """`FeatureMoments` of `extractor`'s features over an image set (at least one image);
    `images` and `batch_size` as in `extract_batches`."""
    acc = MomentAccumulator()
    for f, _ in extract_batches(images, extractor, batch_size=batch_size):
        acc.add(f)
    return acc.moments(extractor_name(extractor))


def feature_stats(images: Images, extractor: nn.Module, *, batch_size: int = 256) -> FeatureStats:
    """Mean and covariance of `extractor`'s features over an image set (see `feature_moments`).
    The covariance is the unbiased one (divides by N - 1), matching torchmetrics and pytorch-fid."""
    return feature_moments(images, extractor, batch_size=batch_size).stats()


def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians fitted to features of the same extractor."""
    if stats_a.extractor != stats_b.extractor or stats_a.dim != stats_b.dim:
        raise ValueError(
            f"cannot compare statistics of different feature spaces: {stats_a.extractor} (d={stats_a.dim}) "
            f"vs {stats_b.extractor} (d={stats_b.dim})"
        )
    value = gaussian_frechet_distance(
        stats_a.mean.double(), stats_a.cov.double(), stats_b.mean.double(), stats_b.cov.double()
    )
    # The exact distance is >= 0; eigenvalue round-off can leave about -1e-10 for identical sets.
    return max(float(value), 0.0)


def fid_from_stats(
    stats_real: FeatureStats, fake_images: Images, extractor: nn.Module, *, batch_size: int = 256
) -> float:
    """FID of `fake_images` against cached real-set statistics from the same extractor."""
    name = extractor_name(extractor)
    if stats_real.extractor != name:
        raise ValueError(
            f"stats_real were computed with extractor {stats_real.extractor!r}, but the extractor passed is {name!r}"
        )
    return frechet_distance(stats_real, feature_stats(fake_images, extractor, batch_size=batch_size))


def fid(real_images: Images, fake_images: Images, extractor: nn.Module, *, batch_size: int = 256) -> float:
    """FID between two image sets, each (N, C, H, W) in [-1, 1] or an iterable of batches."""
    return fid_from_stats(feature_stats(real_images, extractor, batch_size=batch_size), fake_images, extractor,
                          batch_size=batch_size)


class InceptionFeatures(nn.Module):
    """FID Inception-v3: images (B, C, H, W) in [-1, 1], C in {1, 3} -> pool features (B, 2048),
    and with `features_and_logits` also the 1008 class logits the Inception Score reads.

    Images are quantised to 8 bits, as the reference FID sees saved PNGs, grey images are
    repeated to RGB, and the network (torch-fidelity's, "inception-v3-compat") resizes to
    299x299 with the TF1-compatible bilinear resize of the original FID code (antialias off).
    `net(pixels)` returns the tuple (pool features, logits): the logits are torch-fidelity's
    "logits_unbiased" (fc without its bias), which its Inception Score uses.
    """

    name = INCEPTION_NAME
    num_features = 2048

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
        pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        features, logits = self.net(pixels.expand(-1, 3, -1, -1))
        return features, logits

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


class MissingWeights(UserError, FileNotFoundError):
    """The extractor's weights are not where they were looked for (nothing downloads at run time)."""


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: `weights_path`, else the first of
    INCEPTION_WEIGHTS_FILENAMES in torch hub's checkpoint cache ($TORCH_HOME/hub/checkpoints).
    Raises MissingWeights (a FileNotFoundError) saying where to put the file and where it comes from."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MissingWeights(f"FID Inception weights not found at weights_path={str(path)!r}")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for filename in INCEPTION_WEIGHTS_FILENAMES:
        if (cache / filename).is_file():
            return cache / filename
    raise MissingWeights(
        f"FID Inception-v3 weights not found in {cache} (looked for {', '.join(INCEPTION_WEIGHTS_FILENAMES)}). "
        "Nothing is downloaded at run time: fetch the file from "
        f"{INCEPTION_WEIGHTS_URL} (pytorch-fid's conversion of TensorFlow's inception-2015-12-05) and save it as "
        f"{cache / INCEPTION_WEIGHTS_FILENAMES[0]} (set TORCH_HOME to move that cache), or pass weights_path=."
    )


def inception_extractor(weights_path: str | os.PathLike | None = None) -> InceptionFeatures:
    """The standard FID feature extractor (Inception-v3, 2048-d pool features), frozen, on CPU.

    weights_path: the pt_inception-2015-12-05 file; default: torch hub's checkpoint cache.
    Never downloads. Needs the `torch-fidelity` package (its Inception-v3 network).
    """
    path = inception_weights_path(weights_path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ModuleNotFoundError(
            "inception_extractor needs the torch-fidelity package (`pip install torch-fidelity`), "
            "which provides the Inception-v3 of the reference FID"
        ) from err
    # torch-fidelity unpickles the file with weights_only=False; opening it with
    # weights_only=True first refuses a file that carries code instead of tensors.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable PyTorch state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"{path} does not hold FID Inception-v3 weights (no 'fc.weight' tensor)")
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path))
    return InceptionFeatures(net)
