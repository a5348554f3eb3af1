"""orchestration.ray.console without a cluster: which bar a Ray worker draws, what the driver-
drawn bar sends to tqdm_ray, the settings a local Ray starts with, and a sweep's trials
drawing no bar."""
import os
from types import SimpleNamespace

import pytest

from orchestration.ray import console
from orchestration.ray.console import PRINT_PATCH, DriverDrawnBar, quiet_local_ray, worker_progress


class _RayBar:
    """ray.experimental.tqdm_ray.tqdm, recording what it would send to the driver."""

    made: list = []

    def __init__(self, desc="", total=None, unit="it"):
        self.desc, self.total, self.unit, self.n, self.closed = desc, total, unit, 0, False
        _RayBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_description(self, desc):
        self.desc = desc

    def close(self):
        self.closed = True


@pytest.fixture
def ray_bars(monkeypatch):
    from ray.experimental import tqdm_ray

    monkeypatch.setattr(tqdm_ray, "tqdm", _RayBar)
    _RayBar.made = []
    return _RayBar.made


def test_the_driver_draws_the_bar_only_where_each_worker_print_reaches_it_once(monkeypatch):
    monkeypatch.setenv(PRINT_PATCH, "0")
    assert worker_progress(True) is DriverDrawnBar and worker_progress(False) is False
    monkeypatch.setenv(PRINT_PATCH, "1")  # a cluster that keeps Ray Train's print patch: tqdm's own bar
    assert worker_progress(True) is True
    monkeypatch.delenv(PRINT_PATCH)
    assert worker_progress(True) is True


def test_the_trainers_bar_goes_to_tqdm_ray_with_the_loss_in_its_description(ray_bars):
    bar = DriverDrawnBar(total=10, initial=4, desc="train", unit="it", dynamic_ncols=True)
    bar.update(1)
    bar.set_postfix(loss="0.5000")
    bar.close()
    (sent,) = ray_bars
    assert (sent.total, sent.n, sent.desc, sent.unit, sent.closed) == (10, 5, "train loss=0.5000", "it", True)


def test_the_evaluations_bar_counts_the_units_it_yields_and_a_disabled_one_sends_nothing(ray_bars):
    assert list(DriverDrawnBar(["a", "b", "c"], desc="evaluate", unit="shard", file=None)) == ["a", "b", "c"]
    (sent,) = ray_bars
    assert (sent.total, sent.n, sent.closed) == (3, 3, True)
    assert list(DriverDrawnBar(["a"], desc="evaluate", disable=True)) == ["a"] and len(ray_bars) == 1


def test_a_local_ray_starts_quiet_but_keeps_what_the_environment_already_says(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv(PRINT_PATCH, "1")
    quiet_local_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and os.environ[PRINT_PATCH] == "1"


def test_a_sweeps_trials_draw_no_bar(monkeypatch, tmp_path):
    """Tune's trial table is a sweep's progress display: run_trial asks fit_on_ray for none."""
    import ray.tune
    import ray.tune.integration.ray_train

    import orchestration.ray.train
    from orchestration.ray.tune import run_trial
    from orchestration.run import RunConfig

    calls = []
    monkeypatch.setattr(orchestration.ray.train, "fit_on_ray", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: "callback")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    spec = {"cfg": RunConfig(), "sweep_dir": str(tmp_path), "meta": None, "name": "s", "parent_run_id": None,
            "metric": "eval/fid", "mode": "min"}
    run_trial({}, spec)
    (kw,) = calls
    assert kw["progress"] is False


def test_the_module_names_the_print_patch_ray_train_reads():
    from ray.train.v2._internal import constants

    assert constants.ENABLE_PRINT_PATCH_ENV_VAR == console.PRINT_PATCH
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def test_a_train_worker_stops_logging_each_report_at_info():
    import logging

    from ray.train.v2._internal.execution import context

    reports = logging.getLogger(context.__file__)  # the logger Ray Train's report INFO line goes to
    level = reports.level
    try:
        console.quiet_train_worker()
        assert reports.getEffectiveLevel() == logging.WARNING
    finally:
        reports.setLevel(level)
