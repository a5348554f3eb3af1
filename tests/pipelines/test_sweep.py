"""pipelines/conf/sweep/: every task has a typed search space around its own (the paper's) values."""
import dataclasses
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lzn.evaluate import metric_for_key
from orchestration.ray.tune import ParamSpec, SweepConfig, validate_sweep
from orchestration.mlflow.tracker import flatten_params
from pipelines.config import RunConfig
from pipelines.sweep import SweepRun, smoke_space

CONF = Path(__file__).resolve().parents[2] / "pipelines" / "conf"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


def load(*overrides) -> SweepRun:
    from pipelines.config import to_run_config

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_run_config(compose("sweep", overrides=list(overrides)))


def test_every_task_has_a_sweep():
    assert sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")) == TASKS


@pytest.mark.parametrize("task", TASKS)
def test_the_sweep_loads_typed_validates_and_surrounds_the_tasks_values(task):
    cfg = load(f"task={task}")
    assert isinstance(cfg.sweep, SweepConfig) and all(isinstance(s, ParamSpec) for s in cfg.sweep.space.values())
    assert cfg.sweep.name == "full" and cfg.backend == "ray"
    params = flatten_params(dataclasses.asdict(RunConfig(**{f.name: getattr(cfg, f.name)
                                                            for f in dataclasses.fields(RunConfig)})))
    validate_sweep(cfg.sweep, params)
    metric_for_key(cfg, cfg.sweep.metric)  # a metric the objective has
    with initialize_config_dir(str(CONF), version_base="1.3"):
        from pipelines.config import to_run_config

        plain = to_run_config(compose("config", overrides=[f"task={task}"]))  # the task as trained alone
    values = flatten_params(dataclasses.asdict(plain))
    for key, spec in cfg.sweep.space.items():
        value = float(values[key])
        if spec.kind in ("choice", "grid"):
            assert value in [float(v) for v in spec.values], (key, value, spec.values)
        else:
            assert spec.low <= value <= spec.high, (key, value, spec.low, spec.high)
    assert math.isfinite(cfg.sweep.num_samples)


def test_smoke_keeps_the_space_but_not_the_papers_batch_sizes():
    cfg = load("task=repr_imagenet", "scale=smoke")
    notes = smoke_space(cfg)
    assert cfg.sweep.space["train.batch_size"].values == [8] and "fixed at 8" in notes[0]
    assert cfg.sweep.space["latent.alpha"].kind == "uniform"


def test_a_value_that_makes_an_invalid_trial_is_refused_before_the_sweep():
    from pipelines.sweep import check_values

    cfg = load("task=gen_cifar10", "trainer.num_workers=5")  # 2000 splits over 5 workers, 1024 does not
    with pytest.raises(ValueError, match=r"sweep.space.train.batch_size: the value 1024 makes an invalid trial"):
        check_values(cfg, cfg.sweep)
    ok = load("task=gen_cifar10")
    check_values(ok, ok.sweep)
