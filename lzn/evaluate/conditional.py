"""conditional: eval/conditional_accuracy, the class consistency of a joint model's
class-conditional samples: eval.per_class samples of each class, labelled by the digits
CNN (`lzn.metrics.load_digits_classifier`), so only with fid_features=digits_cnn."""
from __future__ import annotations

import torch
from torch import nn

from lzn import metrics, seeds
from lzn.evaluate.core import Evaluator, Job, Metric, Parts, Unit, register, sampling, units_of


def digits_classifier(evaluator: Evaluator) -> nn.Module:
    return metrics.load_digits_classifier(evaluator.cache_dir).to(evaluator.model.device)


@register
class Conditional(Metric):
    name = "conditional"
    objectives = ("joint",)
    kinds = ("conditional",)
    keys = ("eval/conditional_accuracy",)

    def applies(self, cfg) -> bool:
        # Class consistency needs a classifier of the dataset: the digits CNN.
        return super().applies(cfg) and cfg.eval.fid_features == "digits_cnn"

    def plan(self, job: Job) -> list[Unit]:
        return units_of("conditional", job.cfg.data.num_classes * job.cfg.eval.per_class, job.chunk)

    def run(self, evaluator: Evaluator, unit: Unit) -> dict:
        cfg, model, n = evaluator.cfg, evaluator.model, unit.hi - unit.lo
        classifier = evaluator.once(digits_classifier)
        labels = torch.arange(cfg.data.num_classes).repeat(cfg.eval.per_class)[unit.lo:unit.hi]
        images = model.generate(n, labels, first_batch=unit.lo // cfg.eval.batch_size,
                                **{**sampling(cfg), "seed": seeds.conditional_set(cfg.eval.seed)})
        pred = classifier(images.to(model.device)).argmax(dim=1).cpu()
        return {"correct": int((pred == labels).sum()), "count": n}

    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]:
        return {"eval/conditional_accuracy": parts.ratio("conditional", "correct")}
