"""`python -m pipelines.slurm` (what `make slurm` runs) against a real one-node Slurm on this
machine, brought up by infra/slurm/up.sh (munge, slurmctld, slurmd; installed with apt-get
on a fresh machine) on ports of its own and stopped by infra/slurm/down.sh at the end.

A digits job of the stage DAG (pipelines.run) on a Ray cluster inside the allocation is
requeued with `scontrol requeue` once it has a checkpoint: the same job id runs again, skips
the prepared data, resumes from that checkpoint, continues the same MLflow run (the session's
server, $MLFLOW_TRACKING_URI) and evaluates on Ray actors; the same job submitted again skips
every stage. A 2-trial
sweep runs as a Slurm job. The DDP launcher runs the DAG as 2 Slurm tasks and is preempted the way
Slurm warns of a time limit (USR2): the job checkpoints, requeues itself and resumes. Bad
input fails before anything is submitted."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import make_command

ROOT = Path(__file__).resolve().parents[2]
# Smoke-sized runs; no model registry upload or system metrics: seconds the tests do not check.
SMOKE = ["task=gen_digits", "scale=smoke", "poll_s=1", "tracking.register_model=false", "tracking.system_metrics=false"]


def _free_ports(n: int) -> list[int]:
    """n ports free now, held open together so that they differ."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _alive(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


class Cluster:
    def __init__(self, state: Path, env: dict):
        self.state, self.env = state, env

    def run(self, *args: str) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").split()

    def state_of(self, job_id: str) -> str:
        """squeue's state: COMPLETING until every process of the last attempt is gone (scontrol's
        JobState already says PENDING then)."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T").strip()

    def release(self, job_id: str) -> None:
        """Start a requeued job now: Slurm holds one for two minutes (BeginTime). Only once the
        last attempt has ended, or the new one would start among its remains and fail; and in a
        later second than that attempt's credential was revoked, since slurmd refuses a credential
        made in the same second ("Job credential revoked"), which a quick requeue reaches."""
        deadline = time.time() + 120
        while self.state_of(job_id) != "PENDING":
            assert time.time() < deadline, f"job {job_id} is not pending again: {self.state_of(job_id)}"
            time.sleep(0.2)
        time.sleep(1.1)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.fixture(scope="module")
def slurm(request):
    """up.sh on a state folder and ports of its own (a developer's own local cluster is left
    alone), called twice to hold it to its idempotence; down.sh at the end, and also when the
    setup fails (whatever up.sh started before failing, or a second call that broke it)."""
    state = Path(tempfile.mkdtemp(prefix="lzn-slurm-"))  # short: munge's socket path lives there
    ctld_port, slurmd_port = _free_ports(2)
    env = {**os.environ, "LZN_SLURMCTLD_PORT": str(ctld_port), "LZN_SLURMD_PORT": str(slurmd_port)}

    def down() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "infra/slurm/down.sh"), str(state)], env=env, capture_output=True,
                              text=True, timeout=120)

    try:
        up = subprocess.run(["bash", str(ROOT / "infra/slurm/up.sh"), str(state)], env=env, capture_output=True,
                            text=True, timeout=900)
        assert up.returncode == 0, up.stderr[-3000:]
        conf = up.stdout.strip().splitlines()[-1]
        assert conf == f"export SLURM_CONF={state}/slurm.conf"
        pids = (state / "pids").read_text()
        again = subprocess.run(["bash", str(ROOT / "infra/slurm/up.sh"), str(state)], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "already up" in again.stderr, again.stderr
        assert again.stdout.strip().splitlines()[-1] == conf and (state / "pids").read_text() == pids
    except BaseException:
        down()  # the state folder stays: the daemons' logs are in it
        raise
    env.update({"SLURM_CONF": f"{state}/slurm.conf", "LZN_DATA_DIR": str(state / "data"), "OMP_NUM_THREADS": "1"})
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(state, env)
    failed_before = request.session.testsfailed
    yield cluster
    stopped = down()
    assert stopped.returncode == 0, stopped.stderr
    started = [line.split() for line in pids.splitlines()]
    assert [name for name, pid in started] == ["munged", "slurmctld", "slurmd"]
    assert not [name for name, pid in started if _alive(int(pid), name)]
    if request.session.testsfailed == failed_before:  # else kept: the daemons' logs are in it
        shutil.rmtree(state, ignore_errors=True)


def job_id_in(log: Path) -> str | None:
    found = re.search(r"as Slurm job (\d+)", log.read_text())
    return found and found.group(1)


@contextlib.contextmanager
def submitted(cluster: Cluster, *args: str, log: Path):
    """`make slurm TASK=... [SWEEP=1] ARGS=...` following its job, in its own process group. When the
    test fails or times out, its job is cancelled (if it got as far as a job id) before the
    follower is killed: the one-node cluster is full while it runs, and the next test's job
    would wait behind it."""
    with log.open("w") as out:
        proc = subprocess.Popen(make_command("slurm", *args), cwd=ROOT, env=cluster.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    except BaseException:
        job_id = job_id_in(log)
        if job_id:
            subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, timeout=60)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """The follower's output once it exits 0 (the job COMPLETED); a failure otherwise, which
    `submitted` turns into a cancelled job."""
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


def wait_for_checkpoint(ready, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until `ready()` (a checkpoint the job can resume from exists), while the job's follower runs."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, f"no checkpoint in {timeout:g} s:\n" + log.read_text()[-4000:]
        time.sleep(0.2)


def committed_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train has recorded as the run's (a ckpt-* folder alone may
    still be in the writing, and a restored run would not know it)."""
    snapshot = run_dir / "ray" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not there yet, or being replaced
        return None
    return latest and latest["checkpoint_dir_name"]


def ray_processes_of(job_id: str) -> list[int]:
    """Processes still running with this job's Ray temp folder on their command line."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"lzn-ray-{job_id}.".encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_a_dag_job_requeued_midway_resumes_from_its_checkpoint_into_the_same_mlflow_run_and_skips_done_stages(
        slurm, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "slurm.log"
    # 60 short steps: the requeue lands between the first checkpoint (step 10) and the end.
    job_args = (*SMOKE, f"output_dir={out}", "trainer.num_workers=1", "train.iterations=60",
                "train.checkpoint_every=10")
    with submitted(slurm, *job_args, log=log) as proc:
        run_dir = out / "gen_digits" / "smoke-seed0"
        wait_for_checkpoint(lambda: committed_checkpoint(run_dir), proc, log)
        job_id = job_id_in(log)
        slurm.run("scontrol", "requeue", job_id)
        slurm.release(job_id)
        text = finish(proc, log)

    assert f"Slurm job {job_id} ended COMPLETED" in text
    assert f"[slurm] job {job_id} task 0/1 on" in text and "attempt 2, launcher=ray" in text
    assert f"-m pipelines.run {' '.join(job_args[:1])}" in text  # the job runs the stage DAG
    attempt2 = text[text.index("attempt 2, launcher=ray"):]
    assert "[pipeline] prepare: up to date, skipped" in attempt2 and "[pipeline] train: running" in attempt2
    records = {s: json.loads((run_dir / "pipeline" / f"{s}.json").read_text())
               for s in ("prepare", "train", "evaluate", "report")}
    evaluation = Path(records["evaluate"]["outputs"]["metrics"]["path"]).parent
    workers = json.loads((evaluation / "parts" / "workers.json").read_text())  # the Ray actors' parts
    assert workers and all(w["pid"] > 0 for w in workers.values())
    job_dir = run_dir / "slurm" / job_id  # the job and log folders that were reported
    assert f"job folder: {job_dir}" in text and f"run folder: {run_dir}" in text
    heads = [job_dir / f"ray_head.{job_id}.{attempt}.json" for attempt in (0, 1)]  # a head per attempt
    assert all(head.exists() and head.stat().st_mode & 0o777 == 0o600 for head in heads)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["train/resumed_from_step"]
    assert metrics["train/steps"] == 60 and 10 <= resumed < 60 and resumed % 10 == 0
    assert not ray_processes_of(job_id)  # both attempts' Ray processes are gone

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("gen_digits").experiment_id],
                              f"tags.`lzn.run_dir` = '{run_dir}'")
    assert len(runs) == 1  # the requeued attempt continued the first attempt's run
    run = runs[0]
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["lzn.backend"] == "ray"
    assert run.data.metrics["train/resumed_from_step"] == resumed and run.data.metrics["train/steps"] == 60
    assert run.data.metrics["eval/fid"] == pytest.approx(metrics["eval/fid"])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # every step once: none lost, none logged twice

    # The same job again: every stage is done, so it trains and evaluates nothing.
    log2 = tmp_path / "slurm-again.log"
    with submitted(slurm, *job_args, log=log2) as proc:
        again = finish(proc, log2)
    assert "stages: prepare skipped, train skipped, evaluate skipped, report skipped" in again
    assert json.loads((run_dir / "pipeline" / "evaluate.json").read_text()) == records["evaluate"]
    assert len(client.search_runs([run.info.experiment_id], f"tags.`lzn.run_dir` = '{run_dir}'")) == 1
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 61))


def test_a_two_trial_sweep_runs_as_a_slurm_job(slurm, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "slurm.log"
    with submitted(slurm, *SMOKE, "mode=sweep", f"output_dir={out}", "sweep.num_samples=2",
                   "sweep.scheduler=fifo", "sweep.name=slurm", log=log) as proc:
        text = finish(proc, log)
    sweep_dir = out / "gen_digits" / "sweeps" / "slurm"
    assert f"sweep folder: {sweep_dir}" in text and "| rank | trial | status | eval/fid |" in text
    parent_id = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.num_samples"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    assert all(c.info.status == "FINISHED" and "eval/fid" in c.data.metrics for c in children)
    assert not ray_processes_of(job_id_in(log))


def test_the_ddp_launcher_trains_as_two_tasks_and_a_preempted_job_requeues_itself_and_resumes(slurm, tmp_path):
    """USR2 is what Slurm sends slurm.signal_delay_s before the time limit (and what a site's
    preemption sends): submitit calls PipelineJob.checkpoint and requeues the job itself."""
    out = tmp_path / "out"
    log = tmp_path / "slurm.log"
    with submitted(slurm, *SMOKE, f"output_dir={out}", "slurm.launcher=ddp", "slurm.tasks_per_node=2",
                   "slurm.cpus_per_task=1", "train.iterations=60", "train.checkpoint_every=10", log=log) as proc:
        run_dir = out / "gen_digits" / "smoke-seed0"
        # checkpoints/ckpt-*.pt is written atomically: complete once there
        wait_for_checkpoint(lambda: list((run_dir / "checkpoints").glob("ckpt-*.pt")), proc, log)
        job_id = job_id_in(log)
        slurm.run("scancel", "--signal=USR2", job_id)
        slurm.release(job_id)
        text = finish(proc, log)

    assert "Caught signal SIGUSR2" in text and "[slurm] preempted or at the time limit: requeueing" in text
    assert "attempt 2, launcher=ddp" in text and f"Slurm job {job_id} ended COMPLETED" in text
    job_dir = run_dir / "slurm" / job_id
    task1 = (job_dir / f"{job_id}_1_log.err").read_text()  # the second task's own log
    assert "[slurm] torch.distributed rank 0/2" in text and "[slurm] torch.distributed rank 1/2" in task1
    assert not list(job_dir.glob("ray_*"))
    # Every task ran the stage DAG: the requeued attempt skipped what was done, rank 0 wrote the
    # records, and the evaluate stage was sharded over both tasks.
    assert "[pipeline] prepare: up to date, skipped" in text and "stages: prepare skipped, train ran" in text
    assert {p.stem for p in (run_dir / "pipeline").glob("*.json")} == {"prepare", "train", "evaluate", "report"}
    ranks = json.loads(next(run_dir.glob("eval/step-60-*/parts/ranks.json")).read_text())
    assert set(ranks.values()) == {0, 1} and (run_dir / "report.md").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["train/resumed_from_step"]
    assert metrics["train/steps"] == 60 and 10 <= resumed < 60 and "eval/fid" in metrics
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("gen_digits").experiment_id],
                              f"tags.`lzn.run_dir` = '{run_dir}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["lzn.backend"] == "local"
    assert runs[0].data.metrics["train/resumed_from_step"] == resumed
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == list(range(1, 61))


def test_an_unknown_partition_fails_before_anything_is_submitted(slurm, tmp_path):
    before = slurm.queue()
    done = subprocess.run([sys.executable, "-m", "pipelines.slurm", *SMOKE, f"output_dir={tmp_path}",
                           "slurm.partition=nope"], cwd=ROOT, env=slurm.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "error: slurm.partition='nope' is not a partition of this cluster; known partitions: ['debug']" \
        in done.stderr
    assert slurm.queue() == before and not (tmp_path / "gen_digits").exists()


@pytest.mark.parametrize("args, message", [
    (["slurm.nodes=0"], "slurm.nodes must be an integer >= 1, got 0"),
    (["mode=sweep", "slurm.launcher=ddp"], "mode=sweep needs Ray Tune: use slurm.launcher=ray"),
    (["trainer.num_workers=4"], "trainer.num_workers=4 x trainer.cpus_per_worker=1 needs 4 CPUs; the allocation "
                                "has 2 (slurm.nodes=1 x slurm.cpus_per_task=2)"),
    (["slurm.partiton=debug"], "slurm.partiton"),  # a typo in the job's settings
    (["train.iteratons=3"], "train.iteratons"),  # a typo in the pipeline's
    (["slurm=nope"], "nope"),  # an unknown slurm config group
    (["slurm.constraint=no-such-feature"], "sbatch refused the job: "),  # what only sbatch can check
])
def test_bad_settings_fail_before_submission(slurm, tmp_path, monkeypatch, capsys, args, message):
    from pipelines.slurm import main

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    before = slurm.queue()
    assert main([*SMOKE, f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert slurm.queue() == before


def test_a_machine_without_sbatch_fails_saying_how_to_get_a_cluster(tmp_path, monkeypatch, capsys):
    from pipelines.slurm import main

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, no Slurm client
    assert main([*SMOKE, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "`sbatch` and `sinfo` and `scontrol` not found on PATH" in err and "infra/slurm/up.sh" in err
    assert not (tmp_path / "gen_digits").exists()
