"""The digits tasks the evaluation tests run, and an executor that records what it ran."""
from pathlib import Path

import torch

from lzn import evaluate as ev
from lzn.inference import LZNModel
from lzn.objectives import AlignConfig, LatentConfig
from lzn.task import DataConfig, EvalConfig, ModelConfig as TaskModel, TaskConfig, build_objective


def joint_cfg(digits: Path, **eval_overrides) -> TaskConfig:
    return TaskConfig(
        name="joint_digits", objective="joint",
        data=DataConfig(name="digits", shards_dir=str(digits.parent)),
        model=TaskModel(encoder="digits_cnn", decoder="unet_digits"),
        latent=LatentConfig(dim=16, steps=3), align=AlignConfig(steps=3, log=False),
        eval=EvalConfig(**{"batch_size": 8, "sampler_steps": 2, "fid_samples": 40, "per_class": 3, "alpha": 0.0,
                           **eval_overrides}))


def gen_cfg(digits: Path, **eval_overrides) -> TaskConfig:
    return TaskConfig(
        name="gen_digits", objective="generation",
        data=DataConfig(name="digits", shards_dir=str(digits.parent)),
        model=TaskModel(encoder="digits_cnn", decoder="unet_digits"),
        latent=LatentConfig(dim=16, steps=3),
        eval=EvalConfig(**{"batch_size": 8, "sampler_steps": 2, "fid_samples": 40, **eval_overrides}))


def model_of(cfg) -> LZNModel:
    torch.manual_seed(0)
    return LZNModel(build_objective(cfg), (1, 8, 8))


class Recorder:
    """An executor that runs units here and remembers which it was given."""

    def __init__(self, evaluator, store):
        self.evaluator, self.store, self.calls = evaluator, store, []

    def __call__(self, units):
        self.calls.append([u.name for u in units])
        for u in units:
            self.store.save(u, self.evaluator.run(u))


def run(cfg, data, parts: Path, model=None):
    model = model or model_of(cfg)
    evaluator = ev.Evaluator(cfg, model, data, cache_dir=parts.parent / "cache")
    store = ev.PartStore(parts)
    execute = Recorder(evaluator, store)
    out = ev.evaluate(cfg, chosen=ev.select_metrics(cfg, None), data=data, store=store, execute=execute,
                      extractor=lambda: evaluator.extractor)
    return out, execute.calls
