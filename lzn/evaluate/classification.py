"""classification: eval/classification_accuracy of a joint model's own classifier on the
held-out split. Units start on inference-batch boundaries, so LZN's batch-dependent
latents are those of the whole split (`LZNModel.classify(first_batch=)`)."""
from __future__ import annotations

from lzn.evaluate.core import Evaluator, Job, Metric, Parts, Unit, register, units_of


@register
class Classification(Metric):
    name = "classification"
    objectives = ("joint",)
    kinds = ("classify",)
    keys = ("eval/classification_accuracy",)

    def plan(self, job: Job) -> list[Unit]:
        return units_of("classify", job.data.size("test"), job.chunk)

    def run(self, evaluator: Evaluator, unit: Unit) -> dict:
        ev, n = evaluator.cfg.eval, unit.hi - unit.lo
        images, labels = evaluator.data.rows("test", unit.lo, unit.hi)
        pred = evaluator.model.classify(images, batch_size=ev.batch_size, alpha=ev.alpha,
                                        first_batch=unit.lo // ev.batch_size)
        return {"correct": int((pred == labels).sum()), "count": n}

    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]:
        return {"eval/classification_accuracy": parts.ratio("classify", "correct")}
