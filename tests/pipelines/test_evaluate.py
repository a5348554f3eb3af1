"""`python -m pipelines.evaluate` on saved digits checkpoints: real processes, real MLflow."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipelines.test_train import ROOT, train


def evaluate(*overrides, out: Path, check=True):
    import os

    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.evaluate", f"output_dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"pipelines.evaluate failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def folder_of(done) -> Path:
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("evaluation folder: "), done.stdout
    return Path(last.removeprefix("evaluation folder: "))


def test_evaluating_a_saved_checkpoint_reproduces_what_the_training_run_logged(tmp_path):
    train("task=joint_digits", "scale=smoke", out=tmp_path)
    run_dir = tmp_path / "joint_digits" / "smoke-seed0"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    expected = {k: v for k, v in logged.items() if k.startswith("eval/")}
    assert {"eval/fid", "eval/classification_accuracy", "eval/conditional_accuracy"} <= set(expected)

    # By checkpoint file: the config comes from the run folder, the step from the checkpoint.
    done = evaluate("task=joint_digits", "scale=smoke", f"checkpoint={run_dir}/checkpoints/ckpt-000000004.pt",
                    out=tmp_path)
    result = json.loads((folder_of(done) / "metrics.json").read_text())
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6), key
    assert result["eval/checkpoint_step"] == 4
    history = client.get_metric_history(run_id, "eval/fid")  # logged into the training run, at its step
    assert [m.step for m in history] == [4, 4] and history[0].value == pytest.approx(history[1].value, rel=1e-6)
    folder = f"eval/{folder_of(done).name}"  # eval/step-4-<key>: one folder per evaluation
    assert folder.startswith("eval/step-4-")
    assert {f.path for f in client.list_artifacts(run_id, folder)} >= {
        f"{folder}/metrics.json", f"{folder}/samples.png", f"{folder}/latent_zones.png"}

    # By MLflow run id, with the run folder gone: checkpoint and config come from the server.
    shutil.move(run_dir, tmp_path / "moved")
    done = evaluate("task=joint_digits", "scale=smoke", f"checkpoint={run_id}", "metrics=[classification]",
                    out=tmp_path)
    assert "downloaded" in done.stderr
    result = json.loads((folder_of(done) / "metrics.json").read_text())
    assert result["eval/classification_accuracy"] == pytest.approx(expected["eval/classification_accuracy"])
    assert "eval/fid" not in result


def test_an_identical_evaluation_is_not_computed_twice(tmp_path):
    train("task=repr_digits", "scale=smoke", "tracking.enabled=false", out=tmp_path)
    run_dir = tmp_path / "repr_digits" / "smoke-seed0"
    first = evaluate("task=repr_digits", f"checkpoint={run_dir}", "tracking.enabled=false",
                     "eval.probe_epochs=2", out=tmp_path)
    again = evaluate("task=repr_digits", f"checkpoint={run_dir}", "tracking.enabled=false",
                     "eval.probe_epochs=2", out=tmp_path)
    assert folder_of(first) == folder_of(again) and "already holds this evaluation" in again.stderr
    # The run folder's metrics.json gains the evaluation of its latest checkpoint.
    assert json.loads((run_dir / "metrics.json").read_text())["eval/linear_probe_top1"] == \
        json.loads((folder_of(first) / "metrics.json").read_text())["eval/linear_probe_top1"]


@pytest.mark.parametrize("checkpoint, message", [
    ("/no/such/ckpt.pt", "neither a checkpoint file, a run folder, nor an MLflow run id"),
    ("", "checkpoint= is required"),
])
def test_a_bad_checkpoint_says_what_was_expected(tmp_path, checkpoint, message):
    done = evaluate("task=gen_digits", f"checkpoint={checkpoint}", "tracking.enabled=false", out=tmp_path,
                    check=False)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_metrics_the_objective_lacks_are_refused(tmp_path):
    train("task=gen_digits", "scale=smoke", "tracking.enabled=false", out=tmp_path)
    done = evaluate("task=gen_digits", f"checkpoint={tmp_path}/gen_digits/smoke-seed0", "metrics=[linear_probe]",
                    "tracking.enabled=false", out=tmp_path, check=False)
    assert done.returncode != 0 and "do not apply to objective 'generation'" in done.stderr
