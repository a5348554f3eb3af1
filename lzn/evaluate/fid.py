"""fid: every metric of the generated set, from one extractor pass per image.

`lzn.metrics.image_set` gives eval/fid, eval/is (and eval/is_std), eval/kid (eval/kid_std),
eval/precision, eval/recall, and with eval.fid_euler10 the same of an Euler 10-step set
(eval/fid_euler10, ...), as the paper logs beside RK45. KID and precision/recall read a
fixed seeded subset of eval.kid_pr_samples rows of each set; the reference's subset
features are cached with its moments. With the digits CNN (fid_features=digits_cnn) the
same metrics are computed in its feature space, and the Inception Score from its 10 digit
logits: a digits IS (at most 10), not comparable with Inception IS (at most 1008), but the
same definition and still "confident and diverse" classes of generated digits.

The real set's statistics are computed once per dataset, image size and extractor and
cached next to the shards (`ReferenceCache`, keyed by the manifest's checksum and the
extractor's weights); while they are cached, the reference's units are not planned.
"""
from __future__ import annotations

from torch import Tensor

from lzn import metrics
from lzn.errors import UserError
from lzn.eval_data import EvalData
from lzn.evaluate.core import Evaluator, Job, Metric, Parts, Unit, register, sampling, units_of
from lzn.inference import balanced_labels
from lzn.metrics.fid import has_logits
from lzn.metrics.image_set import ImageSetPart, feature_subset
from lzn.reference_cache import ReferenceCache

IMAGE_SET_KEYS = ("fid", "is", "kid", "precision", "recall")  # eval/<name> and eval/<name>_euler10
SETS = (("samples", ""), ("samples_euler10", "_euler10"))  # generated set -> suffix of its keys


def fid_samples(cfg, data: EvalData) -> int:
    return cfg.eval.fid_samples or data.size("train")


def fid_labels(cfg, n: int) -> Tensor | None:
    """The class of every FID sample of a joint model: exactly balanced (`balanced_labels`:
    sample i has class i % num_classes, so each class has n // num_classes samples and the
    first n % num_classes classes one more), as class-conditional FID is measured."""
    if cfg.objective != "joint":
        return None
    return balanced_labels(n, cfg.data.num_classes)


def reference_cache(job: Job) -> tuple[ReferenceCache | None, ImageSetPart | None]:
    """The cache of the reference's statistics (None: the data has no folder, or `job` no
    extractor) and what it holds (None: they are computed in units)."""
    if job.extractor is None or job.data.dataset_dir is None:
        return None, None
    cfg = job.cfg
    cache = ReferenceCache(job.data.dataset_dir, job.extractor(), image_size=cfg.data.image_size,
                           channels=cfg.data.channels, subset=cfg.eval.kid_pr_samples)
    return cache, cache.load()


def image_set(evaluator: Evaluator, images: Tensor, unit: Unit, total: int, *, inception_score: bool) -> dict:
    """The `ImageSetPart` of rows [unit.lo, unit.hi) of a set of `total`, as a state dict."""
    ev = evaluator.cfg.eval
    part = metrics.image_set_part(images, evaluator.extractor, lo=unit.lo, total=total,
                                  subset=feature_subset(total, ev.kid_pr_samples), inception_score=inception_score,
                                  is_splits=ev.is_splits, batch_size=ev.batch_size)
    return part.state_dict()


def merged(parts: Parts, kind: str) -> ImageSetPart:
    return ImageSetPart.merge_all(ImageSetPart.from_state_dict(p) for p in parts.load(kind))


@register
class ImageSetMetrics(Metric):
    name = "fid"
    objectives = ("generation", "rf", "joint")
    kinds = ("reference", "samples", "samples_euler10")
    keys = tuple(f"eval/{k}{suffix}" for k in IMAGE_SET_KEYS for _, suffix in SETS)

    def check_key(self, cfg, key: str) -> None:
        if key.split("/")[1].split("_")[0] in ("kid", "precision", "recall") and cfg.eval.kid_pr_samples < 1:
            raise UserError(f"{key!r} needs eval.kid_pr_samples > 0, got {cfg.eval.kid_pr_samples}")

    def plan(self, job: Job) -> list[Unit]:
        cfg, data, chunk = job.cfg, job.data, job.chunk
        _, reference = job.once(reference_cache)
        units = units_of("reference", data.size("train"), chunk) if reference is None else []
        units += units_of("samples", fid_samples(cfg, data), chunk)
        if cfg.eval.fid_euler10:
            units += units_of("samples_euler10", fid_samples(cfg, data), chunk)
        return units

    def run(self, evaluator: Evaluator, unit: Unit) -> dict:
        cfg, data = evaluator.cfg, evaluator.data
        if unit.kind == "reference":
            images, _ = data.rows("train", unit.lo, unit.hi)
            return image_set(evaluator, images, unit, data.size("train"), inception_score=False)
        labels = fid_labels(cfg, unit.hi)
        sample = sampling(cfg) if unit.kind == "samples" else {**sampling(cfg), "method": "euler", "steps": 10}
        # The Euler set has the samples' seeds: the same noise and latents, another solver.
        fake = evaluator.model.generate(unit.hi - unit.lo, None if labels is None else labels[unit.lo:],
                                        first_batch=unit.lo // cfg.eval.batch_size, **sample)
        return image_set(evaluator, fake, unit, fid_samples(cfg, data), inception_score=has_logits(evaluator.extractor))

    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]:
        cache, reference = job.once(reference_cache)
        if reference is None:
            reference = merged(parts, "reference")
            if cache is not None:
                cache.save(reference)
        out = {}
        for kind, suffix in SETS:
            if parts.units(kind):
                found = metrics.compare(reference, merged(parts, kind), device=job.device)
                out.update({f"eval/{k}{suffix}": v for k, v in found.items() if k != "kid_subset_size"})
                if "kid_subset_size" in found:
                    out["eval/kid_subset_size"] = found["kid_subset_size"]
        out["eval/fid_features"] = job.cfg.eval.fid_features
        out["eval/fid_samples"] = float(fid_samples(job.cfg, job.data))
        out["eval/fid_reference_samples"] = float(reference.moments.num_samples)
        return out
