"""The Ray Train backend end to end: real Ray head, real MLflow server, real processes.

The runs share one Ray head (RAY_ADDRESS) except the 1-worker run, which lets the command
start its own local Ray. Losses are compared in deterministic mode: the batches of a
step are a function of (seed, step), whatever the number of workers.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration.folder import RunFolder

ROOT = Path(__file__).resolve().parents[2]
# 100 short steps with a checkpoint every 20: long enough to kill something mid-run.
LONG = ["task=gen_digits", "scale=smoke", "backend=ray", "train.deterministic=true", "train.batch_size=16",
        "train.iterations=100", "train.checkpoint_every=20", "train.keep_checkpoints=2"]


def command(*overrides, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.train", f"output_dir={out}", *overrides]


def environment(out: Path, head) -> dict:
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return {**env, **(head.env if head else {})}


def train(*overrides, out: Path, head) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*overrides, out=out), cwd=ROOT, capture_output=True, text=True,
                          env=environment(out, head), timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"pipelines.train failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def start(*overrides, out: Path, head) -> subprocess.Popen:
    path = out / f"driver-{time.time_ns()}.log"
    with path.open("w") as log:
        proc = subprocess.Popen(command(*overrides, out=out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=environment(out, head), start_new_session=True)
    proc.log_path = path
    return proc


def logged(run_dir: Path) -> list[dict]:
    path = run_dir / "train_metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = logged(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        log = getattr(proc, "log_path", None)  # a driver whose output goes to a file shows its tail
        assert proc.poll() is None, f"the driver exited ({proc.returncode}) before step {step}" + \
            (f":\n{log.read_text()[-4000:]}" if log else "")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def losses(run_dir: Path) -> list[float]:
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "a step is missing or logged twice"
    return [r["loss"] for r in rows]


def mlflow_run(run_dir: Path):
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return MlflowClient(), run_id


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_head):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(*LONG, "run_name=two", "trainer.num_workers=2", out=out, head=ray_head)
    return out / "gen_digits" / "two"


def test_two_worker_run_logs_params_metrics_and_artifacts(tmp_path, ray_head):
    train("task=joint_digits", "scale=smoke", "backend=ray", "trainer.num_workers=2",
          "tracking.system_metrics_every_s=1", out=tmp_path,
          head=ray_head)
    run_dir = tmp_path / "joint_digits" / "smoke-seed0"
    client, run_id = mlflow_run(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "joint_digits"
    params = run.data.params
    assert params["trainer.num_workers"] == "2" and params["train.batch_size"] == "8"
    assert params["optim.lr.labels"] == "0.001" and params["backend"] == "ray"
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) >= 40 and "backend=ray" in tags["lzn.command"]
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    expected = {json.dumps(r["step"]): r["loss"] for r in logged(run_dir)}
    assert {json.dumps(m.step): m.value for m in history} == pytest.approx(expected, rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["eval/classification_accuracy"] == pytest.approx(metrics["eval/classification_accuracy"])
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    artifacts |= {a.path for folder in ("plots", "checkpoint") for a in client.list_artifacts(run_id, folder)}
    assert {"config.yaml", "metrics.json", "plots/samples.png", "plots/loss_curves.png",
            "plots/latent_zones.png", "checkpoint/ckpt.pt"} <= artifacts, artifacts
    version = client.get_model_version_by_alias("lzn-joint_digits", "candidate")
    assert version.run_id == run_id
    # The evaluation ran on both workers, each computing a share of its units, not on rank 0 alone.
    ranks = json.loads(RunFolder(run_dir).final_evaluation(4).part_ranks.read_text())
    assert set(ranks.values()) == {0, 1}, ranks


def test_one_worker_follows_the_loss_trajectory_of_two(uninterrupted, tmp_path):
    # No RAY_ADDRESS: the command starts (and stops) its own local Ray.
    train(*LONG, "run_name=one", "trainer.num_workers=1", out=tmp_path, head=None)
    one, two = losses(tmp_path / "gen_digits" / "one"), losses(uninterrupted)
    assert len(one) == len(two) == 100
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)


def test_a_killed_worker_resumes_from_its_checkpoint_and_finishes_the_same(uninterrupted, tmp_path, ray_head):
    proc = start(*LONG, "run_name=two", "trainer.num_workers=2", out=tmp_path, head=ray_head)
    run_dir = tmp_path / "gen_digits" / "two"
    try:
        wait_for_step(run_dir, 50, proc)
        worker = json.loads((run_dir / "workers" / "rank-1.json").read_text())
        os.kill(worker["pid"], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, proc.log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Restarted from a checkpoint, not from scratch (the newest one Ray Train's controller had
    # registered when the worker died: reports reach it on its polling period).
    resumed = metrics["train/resumed_from_step"]
    assert 0 < resumed < 100 and resumed % 20 == 0, resumed
    assert losses(run_dir) == pytest.approx(losses(uninterrupted), rel=1e-5, abs=1e-7)
    client, run_id = mlflow_run(run_dir)
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 101))  # no step lost, none twice
    assert client.get_run(run_id).info.status == "FINISHED"


def test_streamed_training_reads_the_shards_through_ray_data(tmp_path, ray_head):
    """data.loader=stream: each worker iterates its Ray Data shard of the train split (half a
    CPU each, so Ray Data's read tasks have the head's other CPU)."""
    train("task=repr_digits", "scale=smoke", "backend=ray", "data.loader=stream", "trainer.num_workers=2",
          "trainer.cpus_per_worker=0.5", "train.iterations=6", "train.checkpoint_every=3", out=tmp_path,
          head=ray_head)
    run_dir = tmp_path / "repr_digits" / "smoke-seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 6 and metrics["train/skipped_steps"] == 0
    assert 0 <= metrics["eval/linear_probe_top1"] <= 1  # evaluated from the shards, by both workers
    ranks = json.loads(RunFolder(run_dir).final_evaluation(6).part_ranks.read_text())
    assert set(ranks.values()) == {0, 1} and {u.split("-")[0] for u in ranks} == {"probe_train", "probe_test"}
    assert len(losses(run_dir)) == 6
    assert (run_dir / "ray" / "ckpt-000000006" / "ckpt.pt").exists()


def test_a_streamed_generation_run_is_evaluated_with_its_fid(tmp_path, ray_head):
    """gen_digits through Ray Data at global batch 400 (3 steps a pass over the 1257 rows):
    the 6 steps cross a pass boundary inside one stream, and the run is evaluated from the
    shards by both workers, FID included (a streamed run is never left unevaluated)."""
    train("task=gen_digits", "scale=smoke", "backend=ray", "data.loader=stream", "trainer.num_workers=2",
          "trainer.cpus_per_worker=0.5", "train.batch_size=400", "train.iterations=6", "train.checkpoint_every=6",
          out=tmp_path, head=ray_head)
    run_dir = tmp_path / "gen_digits" / "smoke-seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 6 and len(losses(run_dir)) == 6
    assert metrics["eval/fid"] > 0 and metrics["eval/fid_samples"] == 16
    ranks = json.loads(RunFolder(run_dir).final_evaluation(6).part_ranks.read_text())
    assert set(ranks.values()) == {0, 1}  # sharded over both workers
