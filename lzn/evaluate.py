"""The evaluation of a trained task: which metrics apply to which objective.

Every metric gets a callable from `LZNModel` (embed / generate / classify / reconstruct),
never the trainer. Keys follow metrics.json: eval/linear_probe_top1, eval/fid,
eval/fid_features, eval/classification_accuracy, eval/conditional_accuracy, ...; the
inference batch size and alpha that LZN's latents depend on are recorded beside them.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lzn import metrics
from lzn.inference import LZNModel


def fid_extractor(name: str, cache_dir: Path, weights: str | None = None) -> nn.Module:
    if name == "digits_cnn":
        return metrics.digits_cnn_extractor(cache_dir)
    if name == "inception":
        return metrics.inception_extractor(weights)
    raise ValueError(f"unknown FID feature extractor {name!r}; expected digits_cnn or inception")


def evaluate(cfg, model: LZNModel, split, *, cache_dir: Path) -> dict[str, float | str]:
    """Metrics of `model` (usually the EMA weights) for task `cfg` on `split`
    (train_images, train_labels, test_images, test_labels)."""
    ev, out = cfg.eval, {}
    bs = ev.batch_size
    sample = dict(method=ev.sampler, steps=ev.sampler_steps, batch_size=bs, seed=ev.seed)
    if cfg.objective in ("representation", "simclr"):
        probe = metrics.linear_probe_eval(
            lambda x: model.embed(x, batch_size=bs), split.train_images, split.train_labels,
            split.test_images, split.test_labels, batch_size=bs, epochs=ev.probe_epochs, lr=ev.probe_lr, seed=ev.seed)
        out["eval/linear_probe_top1"], out["eval/linear_probe_top5"] = probe["top1"], probe["top5"]
    if cfg.objective == "joint":
        out["eval/classification_accuracy"] = metrics.classification_accuracy(
            lambda x: model.classify(x, batch_size=bs, alpha=ev.alpha), split.test_images, split.test_labels,
            batch_size=bs)
        if ev.fid_features == "digits_cnn":
            # Class consistency needs a classifier of the dataset: the digits CNN.
            classifier = metrics.load_digits_classifier(cache_dir)
            out["eval/conditional_accuracy"] = metrics.conditional_accuracy(
                lambda y: model.generate(len(y), y, **sample), classifier,
                num_classes=cfg.data.num_classes, per_class=ev.per_class, batch_size=bs)
    if cfg.objective in ("generation", "rf", "joint"):
        n = ev.fid_samples or len(split.train_images)
        extractor = fid_extractor(ev.fid_features, cache_dir, ev.inception_weights)
        fake = model.generate(n, **sample)
        out["eval/fid"] = metrics.fid(split.train_images, fake, extractor, batch_size=bs)
        out["eval/fid_features"] = ev.fid_features
        out["eval/fid_samples"] = float(n)
        if cfg.objective == "generation":
            out["eval/reconstruction_l2"] = metrics.reconstruction_l2(
                lambda x: model.reconstruct(x, batch_size=bs, method=ev.sampler, steps=ev.sampler_steps),
                split.test_images, batch_size=bs)
    out["eval/inference_batch_size"] = float(bs)
    if cfg.objective not in ("rf", "simclr"):
        out["eval/alpha"] = float(cfg.latent.alpha if ev.alpha is None else ev.alpha)
    return out

