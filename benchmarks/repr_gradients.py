"""Gradient quality of a trained representation-learning run, on its own batches:
`python -m benchmarks.repr_gradients outputs/repr_digits/lzn-seed0 [--batches 10]`.

For each of the run's checkpoints and a few training batches (the run's own views and
latent noise), the encoder gradient of the LZN loss is computed three ways on the same
weights: float64 everywhere (the reference), float32, and float32 with a float64 solver
state (`float64_state`). Printed: the relative error of each float32 gradient against
float64 (median and worst over batches), beside the minibatch noise of the float64
gradient (mean distance of a batch's gradient to the batches' mean, over the mean's
norm), which is what SGD sees anyway. It needs a run folder, so it is not part of the
default `make bench`.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks.report import table
from orchestration.folder import RunFolder

CONF = Path(__file__).resolve().parents[1] / "pipelines" / "conf"


class _Float64Draws:
    """The batch's StepRandom, its draws cast to float64."""

    def __init__(self, rng):
        self.rng = rng

    def normal(self, *shape):
        return self.rng.normal(*shape).double()


def _encoder_gradient(objective, batch: dict) -> torch.Tensor:
    objective.zero_grad()
    loss, _ = objective.loss(batch)
    loss.backward()
    # The head's last bias gets no gradient in exact arithmetic (the flows are centred).
    return torch.cat([p.grad.flatten().double() for n, p in objective.named_parameters()
                      if p.grad is not None and not n.endswith("head.2.bias")])


def measure(run_dir: Path, batches: int) -> list[dict]:
    from lzn.checkpoint import list_checkpoints, load_checkpoint
    from lzn.data.batches import make_batches
    from lzn.data.digits import digits_split
    from lzn.task import build_objective
    from pipelines.config import register, to_run_config

    register()
    overrides = [o for o in OmegaConf.load(RunFolder(run_dir).hydra_overrides)
                 if not o.startswith(("run_name=", "output_dir="))]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=overrides))
    if cfg.data.name != "digits" or cfg.objective != "representation":
        raise SystemExit(f"{run_dir} is a {cfg.objective} run on {cfg.data.name}; this measures representation runs on digits")
    split = digits_split()
    batch_of = make_batches(split.train_images, split.train_labels, global_batch=cfg.train.batch_size,
                            seed=cfg.train.seed, augment=cfg.data.augment, two_view=True)
    rows = []
    for _, ckpt in list_checkpoints(RunFolder(run_dir).checkpoints):
        state = load_checkpoint(ckpt, map_location="cpu")
        models = {}
        for name, exact_state in (("f32", False), ("f32 + f64 state", True)):
            c = copy.deepcopy(cfg)
            c.latent.float64_state = c.align.float64_state = exact_state
            models[name] = build_objective(c)
            models[name].load_state_dict(state["objective"])
        reference = build_objective(cfg)
        reference.load_state_dict(state["objective"])
        reference.double()
        errors = {name: [] for name in models}
        exact = []
        for step in range(state["step"], state["step"] + batches):
            b = batch_of(step)  # a fresh batch each time: its StepRandom is consumed by the loss
            b = {**b, "views": b["views"].double(), "rng": _Float64Draws(b["rng"])}
            exact.append(_encoder_gradient(reference, b))
            for name, model in models.items():
                got = _encoder_gradient(model, batch_of(step))
                errors[name].append(((got - exact[-1]).norm() / exact[-1].norm()).item())
        g = torch.stack(exact)
        row = {"checkpoint": ckpt.name, "minibatch noise": ((g - g.mean(0)).norm(dim=1).mean() / g.mean(0).norm()).item()}
        for name, errs in errors.items():
            row[f"{name} median"] = statistics.median(errs)
            row[f"{name} worst"] = max(errs)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.run_dir, args.batches)
    print(f"\nEncoder-gradient error against float64, {args.batches} batches per checkpoint of {args.run_dir}:")
    print(table(rows))


if __name__ == "__main__":
    main()
