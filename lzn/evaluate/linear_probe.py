"""linear_probe: eval/linear_probe_top1 and eval/linear_probe_top5 of a linear classifier
trained on the frozen features of the train split and tested on the held-out split
(`lzn.metrics.linear_probe`). Units embed rows of either split; the probe trains once, on
all the stored features, in one process (it is small)."""
from __future__ import annotations

import torch

from lzn import metrics
from lzn.evaluate.core import Evaluator, Job, Metric, PartStore, Parts, Unit, register, units_of


def train_probe(cfg, store: PartStore, train_units: list[Unit], test_units: list[Unit], device="cpu",
                progress: bool = True) -> dict:
    """The linear probe on the stored features (one process: the probe is small); progress:
    its epoch bar (False: none)."""
    def gather(units):
        parts = [store.load(u) for u in units]
        return torch.cat([p["features"] for p in parts]).to(device), torch.cat([p["labels"] for p in parts]).to(device)

    ev = cfg.eval
    (xtr, ytr), (xte, yte) = gather(train_units), gather(test_units)
    return metrics.linear_probe(xtr, ytr, xte, yte, epochs=ev.probe_epochs, lr=ev.probe_lr, seed=ev.seed,
                                batch_size=ev.probe_batch_size, standardize=ev.probe_standardize,
                                progress=progress)


@register
class LinearProbe(Metric):
    name = "linear_probe"
    objectives = ("representation", "simclr")
    kinds = ("probe_train", "probe_test")
    keys = ("eval/linear_probe_top1", "eval/linear_probe_top5")

    def plan(self, job: Job) -> list[Unit]:
        data, chunk = job.data, job.chunk
        return units_of("probe_train", data.size("train"), chunk) + units_of("probe_test", data.size("test"), chunk)

    def run(self, evaluator: Evaluator, unit: Unit) -> dict:
        # Train and test images alike: Resize(probe_resize) + CenterCrop(image_size), as the
        # reference's evaluation transform (its probe's train loader, as released, would
        # feed two augmented views to the backbone and cannot run: lzn.metrics.probe).
        ev = evaluator.cfg.eval
        images, labels = evaluator.data.rows(unit.kind.removeprefix("probe_"), unit.lo, unit.hi,
                                             resize=ev.probe_resize or None)
        return {"features": evaluator.model.embed(images, batch_size=ev.batch_size), "labels": labels}

    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]:
        probe = job.probe or (lambda s, a, b: train_probe(job.cfg, s, a, b, device=job.device,
                                                          progress=job.progress))
        result = probe(parts.store, parts.units("probe_train"), parts.units("probe_test"))
        return {"eval/linear_probe_top1": result["top1"], "eval/linear_probe_top5": result["top5"]}
