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


def test_a_generation_sweep_has_an_rf_baseline_at_the_trials_values_and_budget():
    from orchestration.run import as_run_config
    from pipelines.sweep import baseline_config

    cfg = load("task=gen_digits")  # the default `make sweep`
    task = as_run_config(cfg)
    rf = baseline_config(task, cfg.sweep, {"optim.lr.decoder": 1.5e-3, "latent.dim": 8})
    assert cfg.sweep.baseline and rf.objective == "rf" and task.objective == "generation"
    assert rf.optim.lr["decoder"] == 1.5e-3 and rf.latent.dim == 8  # the best trial's values
    assert (rf.train.iterations, rf.train.batch_size, rf.eval.fid_samples) == (400, 64, 500)  # its budget
    assert rf.train.checkpoint_every == 400 and task.train.checkpoint_every == 100  # ASHA reads only the trials'
    assert (rf.model, rf.data) == (task.model, task.data)
    from lzn.task import build_objective

    groups = {n for n, m in build_objective(rf).named_children() if any(True for _ in m.parameters())}
    assert set(rf.optim.lr) == groups == {"decoder"}  # what the trainer asks of optim.lr: RF has no encoder
    assert set(task.optim.lr) == {"encoder", "decoder"}  # the sweep's own config is left as it is
    assert baseline_config(task, dataclasses.replace(cfg.sweep, baseline=False)) is None
    repr_cfg = load("task=repr_digits")  # representation: no RF baseline (its baseline is SimCLR, not swept)
    assert baseline_config(as_run_config(repr_cfg), repr_cfg.sweep) is None
