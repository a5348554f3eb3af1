"""Evaluation metrics. Each takes a callable (embed, generate, classify, reconstruct) or a
feature extractor plus its data, and returns named numbers; none knows the trainer.

- `fid`, `feature_stats`, `fid_from_stats`, `frechet_distance`: Fréchet distance in the
  space of a pluggable extractor (`inception_extractor` for natural images,
  `digits_cnn_extractor` for the 8x8 digits), with reusable real-set statistics;
  `gaussian_frechet_distance` (vendored from torchmetrics).
- `inception_score`, `kernel_inception_distance`, `precision_recall`: the paper's other
  image-set metrics; `image_set_part` / `ImageSetPart` / `compare` compute all of them from
  one extractor pass per shard (KID and precision/recall on a seeded `feature_subset`).
- `linear_probe`, `linear_probe_eval`: the paper's linear probe on frozen features.
- `classification_accuracy`, `conditional_accuracy`, `reconstruction_l2`.
- `load_digits_classifier`: the cached digits CNN that labels generated digits.
"""
from lzn.metrics.classification import classification_accuracy, conditional_accuracy, reconstruction_l2
from lzn.metrics.digits_classifier import (
    DIGITS_CNN_NAME,
    DigitsClassifierConfig,
    DigitsCNN,
    DigitsCNNFeatures,
    digits_cnn_extractor,
    load_digits_classifier,
    resolve_cache_dir,
    train_digits_classifier,
)
from lzn.metrics.fid import (
    INCEPTION_NAME,
    FeatureMoments,
    FeatureStats,
    InceptionFeatures,
    feature_moments,
    feature_stats,
    fid,
    fid_from_stats,
    frechet_distance,
    has_logits,
    inception_extractor,
)
from lzn.metrics.frechet import gaussian_frechet_distance
from lzn.metrics.image_set import ImageSetPart, compare, feature_subset, image_set_part
from lzn.metrics.inception_score import ScoreSums, inception_score, score_sums
from lzn.metrics.kid import kernel_inception_distance
from lzn.metrics.precision_recall import precision_recall
from lzn.metrics.probe import embed_images, linear_probe, linear_probe_eval

__all__ = [
    "DIGITS_CNN_NAME",
    "INCEPTION_NAME",
    "DigitsCNN",
    "DigitsCNNFeatures",
    "DigitsClassifierConfig",
    "FeatureMoments",
    "FeatureStats",
    "ImageSetPart",
    "InceptionFeatures",
    "ScoreSums",
    "classification_accuracy",
    "compare",
    "conditional_accuracy",
    "digits_cnn_extractor",
    "embed_images",
    "feature_moments",
    "feature_stats",
    "feature_subset",
    "fid",
    "fid_from_stats",
    "frechet_distance",
    "gaussian_frechet_distance",
    "has_logits",
    "image_set_part",
    "inception_extractor",
    "inception_score",
    "kernel_inception_distance",
    "linear_probe",
    "linear_probe_eval",
    "load_digits_classifier",
    "precision_recall",
    "reconstruction_l2",
    "resolve_cache_dir",
    "score_sums",
    "train_digits_classifier",
]
