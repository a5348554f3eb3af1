"""No host sync inside a training step: between two log points the project's own code
converts no tensor to a host value (each conversion waits for a GPU to drain its queue).

The counter patches the tensor-to-host conversions of torch.Tensor and counts the calls
whose caller is a file of the project (lzn, orchestration, pipelines); the log points
(`Trainer._report`), checkpoints (`save`), the resume and the summary are paused, as they
read the device by design once per interval.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tuple(str(ROOT / d) + "/" for d in ("lzn", "orchestration", "pipelines"))
CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


class HostConversions:
    """Context manager: records "<method> at <file>:<line>" for every conversion made by
    project code while `counting` is true; the methods are restored on exit."""

    def __init__(self):
        self.counting, self.calls, self._saved = False, [], {}

    def _wrap(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.counting:
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(PROJECT):
                    self.calls.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return method

    def __enter__(self):
        for name in CONVERSIONS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def paused(self, fn):
        def run(*args, **kwargs):
            was, self.counting = self.counting, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.counting = was

        return run


def count_between_log_points(trainer, counter: HostConversions) -> list[str]:
    """Run trainer.fit() counting everything but its log points, checkpoints, resume and
    summary; returns the conversions seen."""
    for name in ("_report", "save", "resume", "_summary"):
        setattr(trainer, name, counter.paused(getattr(trainer, name)))
    counter.calls = []
    counter.counting = True
    try:
        trainer.fit()
    finally:
        counter.counting = False
    return counter.calls


def _task(objective: str):
    from lzn.objectives import AlignConfig, LatentConfig
    from lzn.task import DataConfig, ModelConfig, TaskConfig
    from lzn.trainer import OptimConfig, TrainConfig

    two_view = objective in ("representation", "simclr")
    return TaskConfig(
        name=f"{objective}_digits_small", objective=objective,
        data=DataConfig(augment="simclr_digits" if two_view else "none"),
        model=ModelConfig(encoder="digits_cnn", decoder=None if two_view else "unet_digits"),
        latent=LatentConfig(dim=8, steps=3, solver="dpm++2m" if objective != "representation" else "euler",
                            float64_state=objective == "representation"),
        align=AlignConfig(steps=4, log=objective == "representation"),
        optim=OptimConfig(lr={"encoder": 1e-3, "decoder": 1e-3, "labels": 1e-3}, warmup=2),
        train=TrainConfig(iterations=7, batch_size=16, checkpoint_every=7, log_every=3, progress=False),
    )


def _trainer(objective: str, run_dir, **train_kw):
    from lzn.data.batches import make_batches
    from lzn.data.digits import digits_split
    from lzn.task import TWO_VIEW_OBJECTIVES, build_objective
    from lzn.trainer import Trainer

    cfg = _task(objective)
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    model = build_objective(cfg)
    groups = dict(model.named_children())
    cfg.optim.lr = {k: v for k, v in cfg.optim.lr.items() if k in groups}
    split = digits_split()
    batches = make_batches(split.train_images[:256], split.train_labels[:256], global_batch=cfg.train.batch_size,
                           seed=0, augment=cfg.data.augment, two_view=cfg.objective in TWO_VIEW_OBJECTIVES)
    return Trainer(model, cfg.optim, cfg.train, batches, run_dir=run_dir, progress=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("objective", ["generation", "representation", "joint", "simclr"])
def test_no_host_conversion_between_log_points(objective, tmp_path):
    with HostConversions() as counter:
        trainer = _trainer(objective, tmp_path)
        calls = count_between_log_points(trainer, counter)
    assert trainer.step == 7
    assert calls == []


def test_the_counter_sees_a_sync_in_project_code(tmp_path, monkeypatch):
    """The control: with the zoning value checks left on during steps (the trainer turns
    them off), their host reads show up, from lzn/zoning.py."""
    import lzn.trainer

    monkeypatch.setattr(lzn.trainer.zoning, "check_values", lambda enabled: contextlib.nullcontext())
    with HostConversions() as counter:
        calls = count_between_log_points(_trainer("generation", tmp_path), counter)
    assert len(calls) > 0
    assert all("lzn/zoning.py" in c for c in calls), calls


def test_log_points_still_read_the_device(tmp_path):
    """The reports happen, with the means of finite values: the pause covers them only."""
    rows = []
    trainer = _trainer("generation", tmp_path)
    trainer.callbacks = [type("Log", (), {"on_log": lambda self, step, m: rows.append((step, m))})()]
    with HostConversions() as counter:
        count_between_log_points(trainer, counter)
    assert [s for s, _ in rows] == [3, 6, 7]
    for _, m in rows:
        assert m["train/skipped_steps"] == 0.0 and m["train/skipped"] == 0.0
        assert m["loss"] > 0 and m["train/grad_norm"] > 0
