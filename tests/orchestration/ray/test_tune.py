"""orchestration.ray.tune without a cluster: the search space, trial configs, concurrency, ranking."""
import dataclasses

import pytest

from orchestration.run import RayTrainerConfig, RunConfig
from orchestration.ray.leaderboard import TrialRow, leaderboard, leaderboard_markdown
from orchestration.ray.tune import (
    ParamSpec,
    SweepConfig,
    close_trial_runs,
    concurrent_trials,
    search_space,
    trial_config,
    validate_sweep,
)
from orchestration.mlflow.tracker import flatten_params

def base() -> RunConfig:
    cfg = RunConfig()
    cfg.optim.lr = {"encoder": 1e-4, "decoder": 1e-3}
    return cfg


PARAMS = flatten_params(dataclasses.asdict(base()))


def sweep(**space) -> SweepConfig:
    return SweepConfig(space={k: ParamSpec(**v) for k, v in space.items()})


def test_every_kind_becomes_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space(sweep(**{"optim.lr.encoder": {"kind": "loguniform", "low": 1e-5, "high": 1e-3},
                                  "latent.alpha": {"kind": "uniform", "low": 0.3, "high": 0.6},
                                  "latent.dim": {"kind": "choice", "values": [8, 16]},
                                  "latent.steps": {"kind": "randint", "low": 5, "high": 10},
                                  "align.cutoff": {"kind": "grid", "values": [0.1, 0.2]}}))
    assert isinstance(space["optim.lr.encoder"], Float) and isinstance(space["latent.alpha"], Float)
    assert isinstance(space["latent.dim"], Categorical) and isinstance(space["latent.steps"], Integer)
    assert space["align.cutoff"] == {"grid_search": [0.1, 0.2]}
    assert space["optim.lr.encoder"].lower == 1e-5 and space["latent.dim"].categories == [8, 16]


@pytest.mark.parametrize("space, message", [
    ({"latent.dimm": {"kind": "choice", "values": [1]}}, r"'latent.dimm' is not a key of the task's config"),
    ({"latent.dim": {"kind": "normal", "values": [1]}}, r"kind='normal' is not known"),
    ({"latent.alpha": {"kind": "uniform", "low": 0.6, "high": 0.3}}, "needs low < high"),
    ({"optim.lr.encoder": {"kind": "loguniform", "low": 0.0, "high": 1e-3}}, "loguniform needs low > 0"),
    ({"latent.dim": {"kind": "choice", "values": []}}, "non-empty `values`"),
    ({}, "sweep.space is empty"),
])
def test_a_bad_space_is_named(space, message):
    with pytest.raises(ValueError, match=message):
        validate_sweep(sweep(**space), PARAMS)


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"did you mean \['align.cutoff'\]"):
        validate_sweep(sweep(**{"latent.cutoff": {"kind": "choice", "values": [0.1]}}), PARAMS)


def test_optuna_takes_no_grid():
    s = sweep(**{"latent.dim": {"kind": "grid", "values": [8, 16]}})
    s.search = "optuna"
    with pytest.raises(ValueError, match="optuna cannot take grid"):
        validate_sweep(s, PARAMS)


def test_a_trial_config_sets_nested_and_dict_keys_and_keeps_the_base():
    cfg = base()
    trial = trial_config(cfg, {"latent.dim": 32.0, "optim.lr.encoder": 0.5, "align.cutoff": 0.3})
    assert trial.latent.dim == 32 and isinstance(trial.latent.dim, int)  # a float from Tune, an int field
    assert trial.optim.lr == {"encoder": 0.5, "decoder": 1e-3} and trial.align.cutoff == 0.3
    assert cfg.latent.dim != 32 and cfg.optim.lr["encoder"] == 1e-4  # a copy


def test_concurrency_follows_the_cluster_and_each_trials_workers():
    s = SweepConfig()
    two_workers = RayTrainerConfig(num_workers=2, cpus_per_worker=1.0)
    assert concurrent_trials(s, two_workers, {"CPU": 8}, stream=False) == 4
    assert concurrent_trials(s, two_workers, {"CPU": 8}, stream=True) == 2  # a CPU for Ray Data each
    gpu = RayTrainerConfig(num_workers=2, cpus_per_worker=1.0, use_gpu=True)
    assert concurrent_trials(s, gpu, {"CPU": 64, "GPU": 4}, stream=False) == 2
    s.max_concurrent_trials = 1
    assert concurrent_trials(s, two_workers, {"CPU": 8}, stream=False) == 1
    with pytest.raises(ValueError, match="one trial needs 2 CPUs.*this Ray has 1 CPUs"):
        concurrent_trials(SweepConfig(), two_workers, {"CPU": 1}, stream=False)


def test_the_leaderboard_ranks_finished_trials_first_then_stopped_then_errors():
    s = sweep(**{"latent.dim": {"kind": "choice", "values": [8]}})
    s.mode = "max"
    rows = [TrialRow("a", "stopped early", 0.99, 2, {"latent.dim": 8}, None),
            TrialRow("b", "finished", 0.5, 6, {"latent.dim": 8}, "r1"),
            TrialRow("c", "error", None, 0, {"latent.dim": 8}, None),
            TrialRow("d", "finished", 0.7, 6, {"latent.dim": 16}, "r2")]
    assert [r.trial for r in leaderboard(s, rows)] == ["d", "b", "a", "c"]
    table = leaderboard_markdown(s, leaderboard(s, rows))
    assert table.splitlines()[2] == "| 1 | d | finished | 0.7 | 6 | 16 | r2 |"


def test_what_the_sweep_relies_on_cannot_be_swept():
    for key in ("trainer.num_workers", "train.iterations", "eval.fid_samples", "data.image_size"):
        with pytest.raises(ValueError, match=f"'{key}' cannot be swept"):
            validate_sweep(sweep(**{key: {"kind": "choice", "values": [1, 2]}}), PARAMS)


def test_asha_never_stops_a_trial_at_or_after_its_last_checkpoint():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestration.ray.tune import _scheduler

    cfg = base()
    cfg.train.iterations, cfg.train.checkpoint_every = 400, 100  # 4 checkpoints, a final result as 5
    asha = _scheduler(SweepConfig(metric="eval/fid", mode="min", grace_period=1, reduction_factor=2), cfg)
    asha.set_search_properties("eval_fid", "min")
    milestones = [m for m, _ in asha._brackets[0]._rungs]
    assert max(milestones) < 4
    good, bad = Trial("run_trial", stub=True), Trial("run_trial", stub=True)
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    decisions = {}
    for report in range(1, 6):  # bad is worse at every checkpoint, yet survives past the last rung
        for trial, value in ((good, 1.0), (bad, 2.0 if report < max(milestones) + 1 else 9.0)):
            decisions[trial, report] = asha.on_trial_result(None, trial, {"report": report, "eval_fid": value})
    assert all(decisions[good, r] == TrialScheduler.CONTINUE for r in range(1, 6))
    assert all(decisions[bad, r] == TrialScheduler.CONTINUE for r in range(max(milestones) + 1, 6))


def test_each_trials_run_ends_as_the_sweep_saw_it(server):
    """MLflow's statuses: KILLED for a run ended from outside (a trial ASHA stopped, or the
    sweep was interrupted), FAILED for an error; a finished trial's run is left as it ended."""
    from mlflow import MlflowClient

    client = MlflowClient(server)
    experiment = client.create_experiment("sweep-statuses")
    parent = client.create_run(experiment, tags={"mlflow.runName": "sweep"}).info.run_id
    runs = {}
    for trial, ended in [("torn-down", "FAILED"), ("finished", "FINISHED"), ("crashed", "RUNNING"),
                         ("stopped", "RUNNING"), ("lost", "RUNNING")]:
        runs[trial] = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        if ended != "RUNNING":
            client.set_terminated(runs[trial], ended, end_time=1_000)
    rows = [TrialRow("torn-down", "stopped early", 2.0, 2, {}, runs["torn-down"]),  # its worker wrote FAILED
            TrialRow("finished", "finished", 1.0, 6, {}, runs["finished"]),
            TrialRow("crashed", "error", None, 1, {}, runs["crashed"]),
            TrialRow("stopped", "stopped early", 3.0, 2, {}, runs["stopped"])]  # "lost": no row

    close_trial_runs(server, parent, rows)
    got = {trial: client.get_run(run_id) for trial, run_id in runs.items()}
    assert {t: r.info.status for t, r in got.items()} == {
        "torn-down": "KILLED", "finished": "FINISHED", "crashed": "FAILED", "stopped": "KILLED", "lost": "KILLED"}
    assert {t: r.data.tags["lzn.sweep.status"] for t, r in got.items()} == {
        "torn-down": "stopped early", "finished": "finished", "crashed": "error", "stopped": "stopped early",
        "lost": "interrupted"}
    assert got["torn-down"].info.end_time == 1_000 and got["finished"].info.end_time == 1_000
    assert client.get_run(parent).info.status == "RUNNING"  # the parent is the sweep's to end
