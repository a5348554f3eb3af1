"""`python -m pipelines.train` end to end on digits: real processes, real files."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.folder import RunFolder
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DIGITS_KEYS = {
    "gen_digits": {"eval/fid", "eval/fid_features", "eval/reconstruction_l2"},
    "repr_digits": {"eval/linear_probe_top1"},
    "joint_digits": {"eval/classification_accuracy", "eval/conditional_accuracy", "eval/fid"},
}
TRAIN_KEYS = {"train/steps", "train/skipped_steps", "train/seconds"}


def train(*overrides, out: Path, launcher=(sys.executable, "-m"), check=True, env=None):
    env = {**(os.environ if env is None else env), "LZN_CACHE_DIR": str(out / "cache"),
           "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "pipelines.train", f"output_dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"pipelines.train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def mlflow_run(run_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(), json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


@pytest.mark.parametrize("task", sorted(DIGITS_KEYS))
def test_smoke_run_writes_metrics_and_names_its_folder(task, tmp_path):
    done = train(f"task={task}", "scale=smoke", out=tmp_path)
    last = done.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / task / "smoke-seed0"
    assert last == f"run folder: {run_dir}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert TRAIN_KEYS | DIGITS_KEYS[task] <= set(metrics)
    assert metrics["train/steps"] == 4 and metrics["train/skipped_steps"] == 0
    assert (run_dir / "checkpoints" / "ckpt-000000004.pt").exists()
    assert (tmp_path / "data" / "digits" / "manifest.json").exists()  # prepared on the way, from the shards
    logged = [json.loads(line) for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    client, run_id = mlflow_run(run_dir)  # logged to the session's server ($MLFLOW_TRACKING_URI)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_rerun_resumes_instead_of_restarting(tmp_path):
    run_dir = tmp_path / "gen_digits" / "smoke-seed0"
    train("task=gen_digits", "scale=smoke", "train.iterations=2", out=tmp_path)
    first_run = mlflow_run(run_dir)[1]
    train("task=gen_digits", "scale=smoke", "train.iterations=4", out=tmp_path)
    log = (run_dir / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # steps 1-2 were not redone
    client, run_id = mlflow_run(run_dir)
    assert run_id == first_run  # the same MLflow run continues
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in log]
    for key in sorted({k for row in rows for k in row} - {"step"}):  # every key once a step, the summary's too
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [r["step"] for r in rows if key in r], key
    assert json.loads((run_dir / "metrics.json").read_text())["train/resumed_from_step"] == 2


def test_unknown_task_lists_the_known_ones(tmp_path):
    done = train("task=gen_mnist", out=tmp_path, check=False)
    assert done.returncode != 0
    assert "gen_mnist" in done.stderr and "repr_imagenet" in done.stderr and "gen_digits" in done.stderr


def test_bad_value_fails_before_training(tmp_path):
    done = train("task=gen_digits", "scale=smoke", "latent.solver=rk4", out=tmp_path, check=False)
    assert done.returncode != 0 and "latent.solver" in done.stderr
    assert not (tmp_path / "gen_digits" / "smoke-seed0" / "checkpoints").exists()


def test_torchrun_two_processes_match_one(tmp_path):
    common = ["task=gen_digits", "scale=smoke", "train.deterministic=true", "train.batch_size=16"]
    train(*common, "run_name=one", out=tmp_path)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m")
    train(*common, "run_name=two", "tracking.system_metrics_every_s=1", out=tmp_path, launcher=torchrun)

    def losses(name):
        rows = (tmp_path / "gen_digits" / name / "train_metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)
    # Both processes evaluated (a share of the units each); one process computed them all.
    for name, ranks in (("one", {0}), ("two", {0, 1})):
        record = RunFolder(tmp_path / "gen_digits" / name).final_evaluation(4).part_ranks
        assert set(json.loads(record.read_text()).values()) == ranks, name
    # The node's local rank 0 sampled it into rank 0's run, prefixed by its hostname; rank 0's
    # tracker sampled nothing of its own.
    client, run_id = mlflow_run(tmp_path / "gen_digits" / "two")
    system = {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}
    assert system and all(k.startswith(f"system/{socket.gethostname()}/") for k in system), system


def test_torchrun_streams_the_shards_with_data_loader_stream(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m")
    train("task=repr_digits", "scale=smoke", "data.loader=stream", "data.loader_workers=1", "train.batch_size=16",
          out=tmp_path, launcher=torchrun)
    metrics = json.loads((tmp_path / "repr_digits" / "smoke-seed0" / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and metrics["train/skipped_steps"] == 0
    assert 0 <= metrics["eval/linear_probe_top1"] <= 1  # digits fit in memory: rank 0 evaluates as usual


@pytest.mark.slow
def test_short_digits_run_improves_fid_over_untrained(tmp_path):
    common = ["task=gen_digits", "train.batch_size=64", "eval.fid_samples=256", "eval.sampler_steps=10"]
    train(*common, "train.iterations=1", "run_name=untrained", out=tmp_path)
    train(*common, "train.iterations=300", "run_name=trained", out=tmp_path)
    fid = {n: json.loads((tmp_path / "gen_digits" / n / "metrics.json").read_text())["eval/fid"]
           for n in ("untrained", "trained")}
    assert fid["trained"] < 0.5 * fid["untrained"], fid


def test_without_a_tracking_uri_the_first_run_starts_a_local_server_and_the_next_reuses_it(tmp_path):
    from mlflow import MlflowClient

    from orchestration.mlflow.server import running_server, stop_local_server

    env_without_uri = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    state = tmp_path / "mlflow"
    try:
        first = train("task=gen_digits", "scale=smoke", "run_name=a", out=tmp_path, env=env_without_uri)
        server = running_server(state)
        assert server is not None and server["uri"].startswith("http://127.0.0.1:")
        assert "Started an MLflow server" in first.stdout + first.stderr
        train("task=gen_digits", "scale=smoke", "run_name=b", out=tmp_path, env=env_without_uri)
        assert running_server(state)["pid"] == server["pid"]  # reused, not a second server
        client = MlflowClient(server["uri"])
        runs = client.search_runs([client.get_experiment_by_name("gen_digits").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["a", "b"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert (state / "mlflow.db").exists()
    finally:
        stop_local_server(state)
