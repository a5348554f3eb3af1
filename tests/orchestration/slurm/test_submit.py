"""The Slurm side that needs no cluster: settings validation, the preflight checks against a
submit host without `sbatch` or with a fake `sinfo`, the sbatch options submitit writes, the
job object submitit pickles, the files its tasks meet through, and the process-group
cleanup. The real cluster runs in tests/integration/test_slurm.py."""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import submitit

from orchestration.slurm.settings import SlurmError, SlurmSettings, tasks_per_node, validate_settings
from orchestration.slurm.submit import check_reachable_tracking, executor_parameters, is_final, job_state, preflight, submit
from orchestration.slurm.job import (
    RAY_SOCKET_SUFFIX, SOCKET_PATH_MAX, PipelineJob, _ray_temp, _stop_group, _write_private,
)


@pytest.mark.parametrize("changes, message", [
    ({"nodes": 0}, "slurm.nodes must be an integer >= 1, got 0"),
    ({"cpus_per_task": 0}, "slurm.cpus_per_task must be an integer >= 1, got 0"),
    ({"gpus_per_node": -1}, "slurm.gpus_per_node must be an integer >= 0, got -1"),
    ({"launcher": "mpi"}, "slurm.launcher='mpi' is not known; expected one of ['ray', 'ddp']"),
    ({"time_min": 2, "signal_delay_s": 120}, "slurm.signal_delay_s=120 must be shorter than the time limit"),
    ({"tasks_per_node": 4}, "slurm.tasks_per_node=4 with slurm.launcher=ray"),
    ({"mem_gb": 0.0}, "slurm.mem_gb must be > 0"),
    ({"job_name": "my job"}, "slurm.job_name must be a non-empty word, got 'my job'"),
])
def test_bad_settings_are_named_with_what_was_expected(changes, message):
    with pytest.raises(SlurmError) as e:
        validate_settings(SlurmSettings(**changes))
    assert message in str(e.value)


def test_ray_runs_one_task_per_node_and_ddp_one_per_gpu_unless_told():
    assert tasks_per_node(SlurmSettings(launcher="ray", gpus_per_node=8)) == 1
    assert tasks_per_node(SlurmSettings(launcher="ddp", gpus_per_node=8)) == 8
    assert tasks_per_node(SlurmSettings(launcher="ddp")) == 1
    assert tasks_per_node(SlurmSettings(launcher="ddp", tasks_per_node=3)) == 3


def fake_slurm(folder: Path, partitions: str) -> str:
    """A PATH holding sbatch/scontrol that do nothing and a sinfo that prints `partitions`
    (sinfo's "%P|%D|%a" lines). Returns the PATH value."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "scontrol"):
        (folder / name).write_text("#!/bin/sh\necho 'must not be called' >&2; exit 1\n")
    lines = " ".join(f"'{line}'" for line in partitions.splitlines())
    (folder / "sinfo").write_text(f"#!/bin/sh\nprintf '%s\\n' {lines}\n")  # printf: a builtin, PATH holds nothing else
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return str(folder)


def test_a_host_without_sbatch_is_refused_with_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(SlurmError) as e:
        preflight(SlurmSettings(partition="debug"))
    message = str(e.value)
    assert "`sbatch` and `sinfo` and `scontrol` not found on PATH" in message
    assert "infra/slurm/up.sh" in message


def test_the_partition_must_exist_be_up_and_hold_the_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "debug*|1|up\ngpu|3|up\ngpu|1|up\nold|2|down\n"))
    assert preflight(SlurmSettings(partition=None)) == "debug"  # the default partition (sinfo's *)
    assert preflight(SlurmSettings(partition="gpu", nodes=4)) == "gpu"  # node counts of a partition add up
    with pytest.raises(SlurmError) as e:
        preflight(SlurmSettings(partition="nope"))
    assert str(e.value) == ("slurm.partition='nope' is not a partition of this cluster; known partitions: "
                            "['debug', 'gpu', 'old']")
    with pytest.raises(SlurmError, match=r"slurm.nodes=5 but partition 'gpu' has 4 node\(s\)"):
        preflight(SlurmSettings(partition="gpu", nodes=5))
    with pytest.raises(SlurmError, match="partition 'old' is down, not up"):
        preflight(SlurmSettings(partition="old"))


def test_no_partition_named_and_no_default_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "a|1|up\nb|1|up\n"))
    with pytest.raises(SlurmError, match=r"no default partition; known partitions: \['a', 'b'\]"):
        preflight(SlurmSettings())


def test_an_unreachable_controller_is_reported_with_sinfo_s_own_words(tmp_path, monkeypatch):
    path = fake_slurm(tmp_path, "")
    (tmp_path / "sinfo").write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2; exit 1\n")
    monkeypatch.setenv("PATH", path)
    with pytest.raises(SlurmError, match="`sinfo -h -o %P|%D|%a` failed .exit 1.: Unable to contact slurm controller"):
        preflight(SlurmSettings(partition="debug"))


def test_a_loopback_tracking_server_is_refused_when_the_nodes_are_other_machines(tmp_path, monkeypatch):
    here = socket.gethostname()
    (tmp_path / "sinfo").write_text("#!/bin/sh\nprintf '%s\\n' \"$3\"-nodes\n")  # sinfo -h -p P -o %N
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\n[ \"$3\" = local-nodes ] && printf '%s\\n' {here} "
                                       "|| printf '%s\\n' gpu01 gpu02\n")  # scontrol show hostnames LIST
    for tool in ("sinfo", "scontrol"):
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    check_reachable_tracking("http://127.0.0.1:5000", "local")  # the nodes are this machine
    check_reachable_tracking("http://mlflow.internal:5000", "gpu")  # a server the nodes may reach
    with pytest.raises(SlurmError) as e:
        check_reachable_tracking("http://127.0.0.1:5000", "gpu")
    assert "listens on this machine's loopback, which the nodes of partition 'gpu' (gpu01, gpu02)" in str(e.value)
    assert "set MLFLOW_TRACKING_URI" in str(e.value)


def test_submitit_writes_the_sbatch_options_of_the_settings(tmp_path):
    s = SlurmSettings(partition="gpu", nodes=2, gpus_per_node=8, cpus_per_task=64, mem_gb=480, time_min=1440,
                      account="proj", qos="high", launcher="ray", signal_delay_s=300, setup=["module load cuda"])
    executor = submitit.SlurmExecutor(folder=tmp_path / "%j")
    executor.update_parameters(**executor_parameters(s, "gpu"))
    script = executor._make_submission_file_text("python job.py", "uid")
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                 "--mem=480G", "--time=1440", "--account=proj", "--qos=high", "--signal=USR2@300", "--requeue",
                 "--job-name=lzn"):
        assert f"#SBATCH {line}" in script.splitlines(), line
    assert "module load cuda" in script.splitlines()
    # a task that fails ends the job, instead of the others waiting for it until the time limit
    assert any(line.startswith("srun ") and "--kill-on-bad-exit=1" in line for line in script.splitlines())

    ddp = executor_parameters(SlurmSettings(partition="debug", launcher="ddp", gpus_per_node=4), "debug")
    assert ddp["ntasks_per_node"] == 4 and "mem" not in ddp and "account" not in ddp
    # sbatch takes whole units only: a fractional size is rounded up to whole megabytes
    assert executor_parameters(SlurmSettings(mem_gb=1.5), "debug")["mem"] == "1536M"
    assert executor_parameters(SlurmSettings(mem_gb=0.3), "debug")["mem"] == "308M"


def test_a_job_sbatch_refuses_is_a_slurm_error_in_sbatch_s_words(tmp_path, monkeypatch, capsys):
    path = fake_slurm(tmp_path / "bin", "debug*|1|up\n")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                                             "Invalid account or account/partition combination specified' >&2\n"
                                             "exit 1\n")
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it before submitting
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", path)
    job = PipelineJob(["true"], launcher="ray", cwd=str(tmp_path))
    with pytest.raises(SlurmError) as e:
        submit(SlurmSettings(account="nope"), job, tmp_path / "jobs" / "%j")
    assert str(e.value).startswith("sbatch refused the job: sbatch: error: Batch job submission failed: Invalid "
                                   "account") and "account='nope'" in str(e.value)
    assert "sbatch" not in capsys.readouterr().err  # said once, in the error, not also by submitit


def test_a_slurmctld_that_does_not_answer_is_an_unknown_state_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no sacct: an OSError
    assert job_state("1") == "UNKNOWN"

    def too_slow(args, **kwargs):
        raise subprocess.TimeoutExpired(args, kwargs.get("timeout"))
    monkeypatch.setattr(subprocess, "run", too_slow)
    assert job_state("1") == "UNKNOWN"


def test_preempted_and_node_fail_are_final_only_once_the_job_did_not_come_back():
    assert is_final("COMPLETED", 0) and is_final("FAILED", 0) and not is_final("RUNNING", 100)
    for state in ("PREEMPTED", "NODE_FAIL"):  # a requeueable job passes through them back to PENDING
        assert not is_final(state, 2, grace_s=30) and is_final(state, 30, grace_s=30)
    assert not is_final("REQUEUED", 100) and not is_final("PENDING", 100)


def test_the_head_file_is_written_whole_and_private_and_a_worker_waits_for_it(tmp_path):
    head_file, done_file = tmp_path / "ray_head.7.0.json", tmp_path / "ray_done.7.0"
    _write_private(head_file, json.dumps({"RAY_ADDRESS": "127.0.0.1:1"}))
    assert head_file.stat().st_mode & 0o777 == 0o600 and [p.name for p in tmp_path.iterdir()] == [head_file.name]

    job = PipelineJob(["true"], launcher="ray", cwd=str(tmp_path), ray_start_timeout_s=5)
    head_file.write_text('{"RAY_ADD')  # what a reader may meet of a file written in place
    later = threading.Timer(0.3, _write_private, (head_file, json.dumps({"RAY_ADDRESS": "127.0.0.1:2"})))
    later.start()
    try:
        assert job._head_address(head_file, done_file, tmp_path) == {"RAY_ADDRESS": "127.0.0.1:2"}
    finally:
        later.join()
    head_file.unlink()
    done_file.touch()  # task 0 gave up: no waiting out the deadline
    with pytest.raises(RuntimeError, match="no Ray head address in .*ray_head.7.0.json .task 0 ended first."):
        job._head_address(head_file, done_file, tmp_path)


def test_the_ray_temp_folder_is_new_private_named_by_job_and_short(tmp_path, monkeypatch):
    made = [_ray_temp("123", 1, 0), _ray_temp("123", 1, 0)]
    monkeypatch.setenv("TMPDIR", str(tmp_path / ("x" * 60)))  # Ray's socket paths would not fit under it
    made.append(_ray_temp("12345678", 1, 15))
    try:
        assert made[0] != made[1]  # a new one each time: never one another user could have made first
        for temp in made:
            assert temp.name.startswith(("lzn-ray-123.1.0-", "lzn-ray-12345678.1.15-"))
            assert temp.stat().st_mode & 0o777 == 0o700 and temp.stat().st_uid == os.getuid()
            assert len(str(temp)) + RAY_SOCKET_SUFFIX <= SOCKET_PATH_MAX
    finally:
        for temp in made:
            temp.rmdir()


def test_the_job_pickles_and_checkpoints_as_itself():
    job = PipelineJob([sys.executable, "-m", "pipelines.train", "task=gen_digits"], launcher="ray", cwd="/x",
                      env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    assert isinstance(job, submitit.helpers.Checkpointable)
    again = pickle.loads(pickle.dumps(job))
    assert again.command == job.command and again.env == job.env and again.launcher == "ray"
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    with pytest.raises(SlurmError, match="launcher='mpi' is not known"):
        PipelineJob(["true"], launcher="mpi", cwd="/")


def test_stopping_a_process_group_takes_its_grandchildren_too(tmp_path):
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        open({str(pids)!r}, "w").write(str(child.pid))
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 30
        while not pids.exists() or not pids.read_text():
            assert time.time() < deadline
            time.sleep(0.1)
        grandchild = int(pids.read_text())
        _stop_group(proc, grace_s=5)
    finally:  # a failed wait must not leave `sleep 300` and its parent behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    assert proc.poll() is not None
    time.sleep(0.2)
    stat = Path(f"/proc/{grandchild}/stat")  # gone, or a zombie left for init to reap
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
