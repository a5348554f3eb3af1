"""`make submit` end to end: `python -m pipelines.submit` against a real Ray head with token
authentication (the `ray_head` fixture) and the session's MLflow server, plus the pieces a
submission depends on: what the uploaded working directory holds, the token errors, and the
tracking URI a remote cluster cannot reach.

One digits job (a few seconds of training, most of the time is Ray Train starting its
workers) keeps this file near a minute on two cores.
"""
import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration.ray import jobs as ray_jobs
from tests.integration.conftest import make_command

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def submit(*args, env: dict, timeout: float = 300, make: bool = False) -> subprocess.CompletedProcess:
    """`python -m pipelines.submit ARGS`, the command of `make submit` (whose own exit status is 2
    for any failure), or with make=True `make submit TASK=... ARGS=...` as a user types it."""
    cmd = make_command("submit", *args) if make else [sys.executable, "-m", "pipelines.submit", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def environment(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH}
    return {**env, "LZN_DATA_DIR": str(tmp / "data"), "OMP_NUM_THREADS": "1", **extra}


def test_submit_runs_a_digits_job_on_the_cluster_tracked_in_mlflow(tmp_path, ray_head, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    done = submit("task=gen_digits", "scale=smoke", "trainer.num_workers=1", "run_name=job",
                  "tracking.register_model=false", f"output_dir={tmp_path}", env=environment(tmp_path, **ray_head.env),
                  make=True)
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    job_id = re.search(r"^submission id: (\S+)$", out, re.M).group(1)
    url = re.search(r"^submitted to (http://\S+): ", out, re.M).group(1)
    assert job_id.startswith("lzn-gen_digits-train-")
    # The job's own output reached us (its logs were followed), then its outcome.
    assert "Running entrypoint for job" in out and f"run folder: {tmp_path / 'gen_digits' / 'job'}" in out
    assert re.search(r"^job id: \S+ \(submission " + re.escape(job_id) + r"\)$", out, re.M)
    assert out.rstrip().endswith(f"job {job_id} SUCCEEDED")
    # The interpreter of this machine's venv ran it (a cluster on 127.0.0.1), on Ray workers.
    assert f"{sys.executable} -m pipelines.train task=gen_digits" in out and "backend=ray" in out

    for key in AUTH:  # the client sees only the URL and the token passed here
        monkeypatch.delenv(key, raising=False)
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}"})
    info = client.get_job_info(job_id)
    assert str(info.status) in ("SUCCEEDED", "JobStatus.SUCCEEDED")
    assert info.metadata["lzn.task"] == "gen_digits" and info.metadata["lzn.mode"] == "train"

    run_dir = tmp_path / "gen_digits" / "job"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    mlflow = MlflowClient()  # the session's server, which the job logged to through the runtime env
    experiment = mlflow.get_experiment_by_name("gen_digits")
    found = mlflow.search_runs([experiment.experiment_id], "attributes.run_name = 'job'")
    assert [r.info.run_id for r in found] == [run_id]
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["backend"] == "ray" and run.data.params["trainer.num_workers"] == "1"
    assert sorted(m.step for m in mlflow.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    assert run.data.metrics["eval/fid"] == pytest.approx(metrics["eval/fid"])


def test_a_missing_or_wrong_token_is_refused_with_what_to_set(tmp_path, ray_head):
    address = ray_head.address
    missing = submit("task=gen_digits", env=environment(tmp_path, RAY_ADDRESS=address, HOME=str(tmp_path)))
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert f"the Ray cluster at {address} uses token authentication and needs a token" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "submission id" not in missing.stdout

    wrong = submit("task=gen_digits", env=environment(tmp_path, RAY_ADDRESS=address, RAY_AUTH_TOKEN="0" * 64))
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert f"the Ray cluster at {address} uses token authentication and refused the token" in wrong.stderr


def test_a_failed_job_exits_1_with_its_status_and_a_token_alone_is_enough(tmp_path, ray_head):
    """`python=/bin/false` makes the job's command fail at once: the FAILED path without a
    training run. The token without RAY_AUTH_MODE switches token mode on by itself."""
    env = environment(tmp_path, RAY_ADDRESS=ray_head.address, RAY_AUTH_TOKEN=ray_head.env["RAY_AUTH_TOKEN"])
    failed = submit("task=gen_digits", "python=/bin/false", f"output_dir={tmp_path}", env=env, timeout=120)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    job_id = re.search(r"^submission id: (\S+)$", failed.stdout, re.M).group(1)
    assert re.search(rf"^error: job {job_id} FAILED on http://\S+: .*exit code 1", failed.stderr, re.M), failed.stderr


def test_no_address_or_an_unreachable_one_fails_in_seconds_naming_it(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    none = submit("task=gen_digits", env=environment(tmp_path), timeout=60)
    assert none.returncode == 2 and "no Ray cluster to submit to: set RAY_ADDRESS" in none.stderr
    address = f"127.0.0.1:{port}"
    gone = submit("task=gen_digits", f"address={address}", env=environment(tmp_path), timeout=60)
    assert gone.returncode == 2 and f"cannot reach the Ray cluster at {address}" in gone.stderr


def test_the_upload_holds_the_code_and_not_the_venv_outputs_or_data(tmp_path):
    """Ray's own packager, on a tree shaped like the project: anchored excludes keep the
    lzn/data package while dropping the prepared data/ at the root."""
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for name in (".venv/lib/site.py", "outputs/gen_digits/ckpt.pt", "data/digits/train/part-0.parquet",
                 ".git/HEAD", "mlruns/0/meta.yaml", "bench-results/x.json", "lzn/__pycache__/a.cpython-311.pyc",
                 "lzn_platform.egg-info/PKG-INFO", "lzn/data/shards.py", "lzn/zoning.py", "pipelines/conf/config.yaml",
                 "infra/ray/cluster.yaml", "pyproject.toml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    env = ray_jobs.runtime_env(local=True, root=project, env={})
    assert env["working_dir"] == str(project)
    package = tmp_path / "package.zip"
    create_package(env["working_dir"], package, include_gitignore=False, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert names == {"lzn/data/shards.py", "lzn/zoning.py", "pipelines/conf/config.yaml", "infra/ray/cluster.yaml",
                     "pyproject.toml"}
    # And the real project stays small enough to upload on every submission.
    real = tmp_path / "real.zip"
    create_package(str(ROOT), real, include_gitignore=False, excludes=ray_jobs.EXCLUDES)
    assert real.stat().st_size < 5 * 2**20, real.stat().st_size


def test_the_environment_carries_tracking_and_data_and_refuses_a_loopback_uri_for_a_remote_cluster(tmp_path):
    here = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "LZN_CACHE_DIR": "/c", "HOME": "/home/x"}
    local = ray_jobs.runtime_env(local=True, root=tmp_path, env=here)
    assert local["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "LZN_CACHE_DIR": "/c",
                                 "LZN_DATA_DIR": str(tmp_path / "data")}
    with pytest.raises(ray_jobs.SubmitError, match=r"MLFLOW_TRACKING_URI=http://127.0.0.1:5000 is a tracking server "
                                                   r"on this machine's loopback"):
        ray_jobs.runtime_env(local=False, root=tmp_path, env=here)
    remote = ray_jobs.runtime_env(local=False, root=tmp_path,
                                  env={"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "LZN_DATA_DIR": "/shared/d"})
    assert remote["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "LZN_DATA_DIR": "/shared/d"}


def test_addresses_map_to_the_jobs_api_and_the_interpreter_follows_the_cluster():
    assert ray_jobs.jobs_api_url("http://10.0.0.5:8265") == "http://10.0.0.5:8265"
    with pytest.raises(ray_jobs.SubmitError, match="Ray Client address"):
        ray_jobs.jobs_api_url("ray://10.0.0.5:10001")
    with pytest.raises(ray_jobs.SubmitError, match="is not host:port"):
        ray_jobs.jobs_api_url("10.0.0.5")
    assert ray_jobs.cluster_address(None, {"RAY_ADDRESS": "h:6379", "RAY_API_SERVER_ADDRESS": "http://h:8265"}) \
        == "http://h:8265"
    assert ray_jobs.cluster_address("x:1", {"RAY_ADDRESS": "h:6379"}) == "x:1"
    assert ray_jobs.is_local("http://127.0.0.1:8265") and not ray_jobs.is_local("http://10.0.0.5:8265")
    assert not ray_jobs.cluster_is_local("http://10.0.0.5:8265")  # decided without asking
    assert ray_jobs.default_python(local=True) == sys.executable and ray_jobs.default_python(local=False) == "python"
    assert ray_jobs.entrypoint("pipelines.train", ["task=gen_digits", "output_dir=${oc.env:X,outputs}"],
                               python="python") == "python -m pipelines.train task=gen_digits 'output_dir=${oc.env:X,outputs}'"


def test_submit_arguments_become_the_pipeline_command_and_typos_fail_before_the_upload(monkeypatch):
    from pipelines import submit as cli

    sub = cli.parse(["task=gen_digits", "scale=smoke", "--no-wait", "python=/opt/py/bin/python"])
    assert (sub.mode, sub.wait, sub.python, sub.overrides) == ("train", False, "/opt/py/bin/python",
                                                               ["task=gen_digits", "scale=smoke"])
    assert cli.pipeline_args(sub, local=True) == ["task=gen_digits", "scale=smoke", "backend=ray",
                                                  f"output_dir={ROOT / 'outputs'}"]
    # A remote job's run folder is what the cluster's nodes call $LZN_OUTPUT_DIR (shared storage).
    remote = cli.pipeline_args(cli.parse(["task=gen_digits", "mode=sweep", "wait=false"]), local=False)
    assert remote == ["task=gen_digits", "output_dir=${oc.env:LZN_OUTPUT_DIR,outputs}"]
    monkeypatch.setenv("LZN_OUTPUT_DIR", "/shared/outputs")
    assert cli.compose("sweep", remote).output_dir == "/shared/outputs"
    with pytest.raises(ray_jobs.SubmitError, match=r"do not make a valid `pipelines.train` config: .*trainr"):
        cli.compose("train", ["task=gen_digits", "trainr.num_workers=2"])
    with pytest.raises(ray_jobs.SubmitError, match=r"mode='eval' is not known; expected one of \['train', 'run', "):
        cli.parse(["mode=eval"])
