"""`python -m pipelines.sweep` end to end: a local Ray started by the command, the session's
MLflow server, ASHA stopping trials, and a driver killed mid-sweep that the same command
resumes. Trials run one at a time (max_concurrent_trials=1), so ASHA sees the same results
in the same order on every run."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ["task=gen_digits", "scale=smoke", "sweep.num_samples=4", "sweep.max_concurrent_trials=1",
         "train.iterations=6", "train.checkpoint_every=2", "sweep.name=it"]


def command(out: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return [sys.executable, "-m", "pipelines.sweep", f"output_dir={out}", *SWEEP], env


def finished_trials(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (sweep_dir / "trials").glob("*/metrics.json"))


def test_a_sweep_nests_its_trials_stops_poor_ones_and_resumes_after_a_killed_driver(tmp_path):
    cmd, env = command(tmp_path)
    sweep_dir = tmp_path / "gen_digits" / "sweeps" / "it"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    while not finished_trials(sweep_dir):  # kill the driver (and the Ray it started) after one trial
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.time() < deadline, "no trial finished in 10 minutes"
        time.sleep(1)
    done_before = {p.name: [(p / f).stat().st_mtime_ns for f in ("metrics.json", "train_metrics.jsonl")]
                   for p in finished_trials(sweep_dir)}
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    parent_id = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-4000:]
    assert "resuming the sweep" in again.stderr
    assert json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"] == parent_id  # the parent continues
    for name, mtimes in done_before.items():  # finished trials were not trained or evaluated again
        assert [(sweep_dir / "trials" / name / f).stat().st_mtime_ns for f in ("metrics.json",
                                                                               "train_metrics.jsonl")] == mtimes

    rows = list(csv.DictReader((sweep_dir / "leaderboard.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"finished", "stopped early"}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["steps"]) < 6 for r in stopped)  # ASHA stopped at a checkpoint
    assert rows[0]["status"] == "finished" and float(rows[0]["eval/fid"]) == min(
        float(r["eval/fid"]) for r in rows if r["status"] == "finished")
    assert "| rank | trial | status | eval/fid |" in again.stdout  # the leaderboard is printed
    assert (sweep_dir / "task" / "best_gen_digits.yaml").read_text().startswith("# @package _global_")

    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.num_samples"] == "4"
    assert {"leaderboard.md", "leaderboard.csv", "best_gen_digits.yaml"} <= {
        f.path for f in client.list_artifacts(parent_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4
    by_trial = {c.data.tags["lzn.trial"]: c for c in children}
    for row in rows:
        child = by_trial[row["trial"]]
        assert child.info.run_id == row["mlflow_run_id"]
        assert child.data.tags["lzn.sweep.status"] == row["status"]
        assert "loss" in child.data.metrics and child.data.params["optim.lr.encoder"] == row["optim.lr.encoder"]
        if row["status"] == "stopped early":
            assert child.info.status == "KILLED"
        else:
            assert child.info.status == "FINISHED" and "eval/fid" in child.data.metrics

    # The RF baseline: the best trial's values and budget, its own run tagged as the sweep's
    # baseline (not a trial), with its dataset, and the report shows it beside the best trial.
    best = rows[0]
    baseline = json.loads((sweep_dir / "baseline" / "metrics.json").read_text())
    assert baseline["train/steps"] == 6 and baseline["eval/fid"] > 0
    assert "RF baseline (objective=rf" in again.stdout and f"RF + LZN (trial {best['trial']})" in again.stdout
    [rf] = client.search_runs([parent.info.experiment_id], f"tags.`lzn.sweep.baseline` = '{parent_id}'")
    assert rf.info.status == "FINISHED" and rf.data.params["objective"] == "rf"
    assert float(rf.data.params["optim.lr.decoder"]) == pytest.approx(float(best["optim.lr.decoder"]), rel=1e-3)
    assert rf.data.metrics["eval/fid"] == baseline["eval/fid"] and "mlflow.parentRunId" not in rf.data.tags
    assert parent.data.metrics["baseline/eval/fid"] == baseline["eval/fid"]
    assert [d.dataset.name for d in rf.inputs.dataset_inputs] == ["digits"]  # the run's data, as an MLflow input
    from dashboards.report import build_report

    page = build_report(client.tracking_uri, "gen_digits", "it", out=tmp_path / "report.html").read_text()
    section = page[page.index('id="rf-vs-lzn"'):]
    assert rf.info.run_name in section and by_trial[best["trial"]].info.run_name in section
    assert 'id="samples-rf"' in section and 'id="samples-lzn"' in section


def test_a_task_without_its_data_fails_before_any_trial(tmp_path):
    cmd, env = command(tmp_path)
    cmd = [c for c in cmd if not c.startswith("task=")] + ["task=repr_imagenet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "dataset 'imagenet' is not prepared" in done.stderr and str(tmp_path / "data" / "imagenet") in done.stderr
    assert "ILSVRC2012_img_train.tar" in done.stderr and "pipelines.prepare data=imagenet" in done.stderr
    assert not (tmp_path / "repr_imagenet" / "sweeps" / "it" / "tune").exists()
