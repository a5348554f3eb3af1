"""Evaluation metrics. Each takes a callable (embed, generate, classify, reconstruct) or a
feature extractor plus its data, and returns named numbers; none knows the trainer.

- `fid`, `feature_stats`, `fid_from_stats`, `frechet_distance`: Fréchet distance in the
  space of a pluggable extractor (`inception_extractor` for natural images,
  `digits_cnn_extractor` for the 8x8 digits), with reusable real-set statistics.
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
    inception_extractor,
)
from lzn.metrics.probe import embed_images, linear_probe, linear_probe_eval

__all__ = [
    "DIGITS_CNN_NAME",
    "INCEPTION_NAME",
    "DigitsCNN",
    "DigitsCNNFeatures",
    "DigitsClassifierConfig",
    "FeatureMoments",
    "FeatureStats",
    "InceptionFeatures",
    "classification_accuracy",
    "conditional_accuracy",
    "digits_cnn_extractor",
    "embed_images",
    "feature_moments",
    "feature_stats",
    "fid",
    "fid_from_stats",
    "frechet_distance",
    "inception_extractor",
    "linear_probe",
    "linear_probe_eval",
    "load_digits_classifier",
    "reconstruction_l2",
    "resolve_cache_dir",
    "train_digits_classifier",
]
