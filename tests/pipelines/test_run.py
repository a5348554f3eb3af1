"""`python -m pipelines.run`: the stage DAG on digits, real processes and the session's MLflow."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.pipelines.test_train import ROOT

SMOKE = ["task=gen_digits", "scale=smoke"]


def pipeline(*overrides, out: Path, check=True):
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "LZN_CACHE_DIR": str(out / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.run", f"output_dir={out}", *SMOKE, *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"pipelines.run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def stages(done) -> dict[str, str]:
    line = next(x for x in done.stdout.splitlines() if x.startswith("stages: "))
    return dict(part.split() for part in line.removeprefix("stages: ").split(", "))


def test_the_dag_runs_once_then_reruns_only_what_a_change_touches(tmp_path):
    run_dir = tmp_path / "gen_digits" / "smoke-seed0"
    first = pipeline(out=tmp_path)
    assert stages(first) == {"prepare": "ran", "train": "ran", "evaluate": "ran", "report": "ran"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and "eval/fid" in metrics and "eval/reconstruction_l2" in metrics
    report = (run_dir / "report.md").read_text()
    assert "| eval/fid |" in report and "![Samples](eval/step-4-" in report
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert "report.md" in {f.path for f in MlflowClient().list_artifacts(run_id)}

    assert stages(pipeline(out=tmp_path)) == {s: "skipped" for s in ("prepare", "train", "evaluate", "report")}
    changed_eval = pipeline("eval.sampler_steps=3", out=tmp_path)
    assert stages(changed_eval) == {"prepare": "skipped", "train": "skipped", "evaluate": "ran", "report": "ran"}
    longer = pipeline("eval.sampler_steps=3", "train.iterations=6", out=tmp_path)
    assert stages(longer) == {"prepare": "skipped", "train": "ran", "evaluate": "ran", "report": "ran"}
    log = [json.loads(line)["step"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # training resumed from step 4


def test_a_failed_stage_is_named_and_the_rerun_resumes_there(tmp_path):
    broken = pipeline("eval.fid_features=inception", "eval.inception_weights=/no/such/weights.pth",
                      "tracking.enabled=false", out=tmp_path, check=False)
    assert broken.returncode != 0
    assert "stage 'evaluate' failed" in broken.stderr and "resume from stage 'evaluate'" in broken.stderr
    state = tmp_path / "gen_digits" / "smoke-seed0" / "pipeline"
    assert {p.stem for p in state.glob("*.json")} == {"prepare", "train"}
    fixed = pipeline("tracking.enabled=false", out=tmp_path)
    assert stages(fixed) == {"prepare": "skipped", "train": "skipped", "evaluate": "ran", "report": "ran"}


def test_only_the_selected_stages_run(tmp_path):
    done = pipeline("stages=[prepare,train]", "tracking.enabled=false", out=tmp_path)
    assert stages(done) == {"prepare": "ran", "train": "ran"}
    assert not (tmp_path / "gen_digits" / "smoke-seed0" / "eval").exists()
    refused = pipeline("stages=[report]", "tracking.enabled=false", out=tmp_path, check=False)
    assert refused.returncode != 0 and "stage 'report' needs ['evaluate']" in refused.stderr


def test_a_change_to_what_is_trained_is_refused_in_the_same_run_folder(tmp_path):
    pipeline("stages=[prepare,train]", "tracking.enabled=false", out=tmp_path)
    refused = pipeline("stages=[prepare,train]", "tracking.enabled=false", "optim.lr.decoder=0.5", out=tmp_path,
                       check=False)
    assert refused.returncode != 0 and "stage 'train' failed" in refused.stderr
    assert "trained with other settings (optim.lr.decoder" in refused.stderr and "run_name=" in refused.stderr
    elsewhere = pipeline("stages=[prepare,train]", "tracking.enabled=false", "optim.lr.decoder=0.5",
                         "run_name=lr05", out=tmp_path)
    # A new run folder keeps its own records (prepare finds its shards in place and rewrites none).
    assert stages(elsewhere) == {"prepare": "ran", "train": "ran"} and "digits: up to date" in elsewhere.stderr
