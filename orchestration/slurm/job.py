"""What runs inside a Slurm allocation: `PipelineJob`, the submitit job `orchestration.slurm.submit`
submits. On every task it brings up (launcher=ray) or joins the job's own Ray cluster, or
exports the torch.distributed environment (launcher=ddp), runs the pipeline command, and
stops what it started; it is `Checkpointable`, so a preempted or timed-out job requeues
itself and the same command resumes from its run folder.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import submitit

from orchestration.slurm.settings import LAUNCHERS, SlurmError

RAY_STARTED = "Ray runtime started"  # what `ray start` prints once every process of the node is up


def _free_ports(host: str, n: int) -> list[int]:
    """n distinct ports free on `host` now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_ip(single_node: bool) -> str:
    """127.0.0.1 for a one-node job (nothing leaves the node); else the address other nodes
    reach this one at: the source address of the route out (no packet is sent)."""
    if single_node:
        return "127.0.0.1"
    for target in os.environ.get("SLURM_LAUNCH_NODE_IPADDR", ""), "10.255.255.255":
        if not target:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 1))
                ip = s.getsockname()[0]
            except OSError:
                continue
        if not ip.startswith("127."):
            return ip
    return socket.gethostbyname(socket.gethostname())


# What Ray appends to its temp folder for its sockets: /session_<date>_<time>_<µs>_<pid>/sockets/
# dash_MetricsHead, up to ~68 characters; the whole path must fit a Unix socket's 107.
RAY_SOCKET_SUFFIX = 70
SOCKET_PATH_MAX = 107


def _ray_temp(job_id: str, attempt: int, rank: int) -> Path:
    """A new folder of this user's only (mode 0700, a random suffix): a predictable name in a
    shared /tmp could be planted by another user before Ray trusts it. In $TMPDIR when Ray's
    socket paths still fit under it, else in /tmp; `lzn-ray-<job>.` is what finds a job's
    Ray processes."""
    prefix = f"lzn-ray-{job_id}.{attempt}.{rank}-"
    base = os.environ.get("TMPDIR") or "/tmp"
    if len(base) + 1 + len(prefix) + 8 + RAY_SOCKET_SUFFIX > SOCKET_PATH_MAX:  # mkdtemp adds 8 characters
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _write_private(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temp file of mode 0600 renamed over it): the workers
    read it as soon as it exists, and it holds the cluster's token."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ignore_usr2() -> None:
    # The preemption signal is for submitit's handler in the job's main process; the pipeline
    # and Ray would die of it (SIGUSR2's default action) before the checkpoint is pickled.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        try:  # the leader is gone; its group may still hold children
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    except (ProcessLookupError, PermissionError):
        pass


class _Terminated(BaseException):
    """Slurm is ending this attempt (SIGTERM: requeue, preemption, cancel, time limit)."""


class PipelineJob(submitit.helpers.Checkpointable):
    """What every task of the allocation runs (see the module docstring). Picklable: submitit
    stores it in the job folder, and a requeued job unpickles and runs it again."""

    def __init__(self, command: list[str], *, launcher: str, cwd: str, env: dict[str, str] | None = None,
                 gpus_per_node: int = 0, ray_start_timeout_s: float = 120.0):
        if launcher not in LAUNCHERS:
            raise SlurmError(f"launcher={launcher!r} is not known; expected one of {list(LAUNCHERS)}")
        self.command, self.launcher, self.cwd = list(command), launcher, str(cwd)
        self.env = dict(env or {})
        self.gpus_per_node, self.ray_start_timeout_s = gpus_per_node, ray_start_timeout_s

    def checkpoint(self, *args, **kwargs):
        """Preemption or time limit: requeue this same job. The pipeline's own checkpoints (in
        its fixed run folder) carry the state, so the submission needs nothing new."""
        print("[slurm] preempted or at the time limit: requeueing; the next attempt resumes from the last "
              "checkpoint", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> int:
        def terminated(signum, frame):
            raise _Terminated(signal.Signals(signum).name)

        # Slurm sends SIGTERM when it ends this attempt (`scontrol requeue`, preemption, scancel):
        # leave without a result so submitit does not record a failure for a job that runs again.
        signal.signal(signal.SIGTERM, terminated)
        env = submitit.JobEnvironment()
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        print(f"[slurm] job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}, attempt "
              f"{attempt + 1}, launcher={self.launcher}", file=sys.stderr, flush=True)
        try:
            if self.launcher == "ddp":
                dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
                print(f"[slurm] torch.distributed rank {dist_env.rank}/{dist_env.world_size}, master "
                      f"{dist_env.master_addr}:{dist_env.master_port}", file=sys.stderr, flush=True)
                return self._run_pipeline({})
            return self._run_on_ray(env, attempt)
        except _Terminated as e:
            print(f"[slurm] {e.args[0]}: this attempt ends here (requeued, preempted or cancelled)",
                  file=sys.stderr, flush=True)
            os._exit(143)  # no submitit result file: the job's next attempt, if any, writes it

    # ------------------------------------------------------------------ the pipeline
    def _run_pipeline(self, extra_env: dict[str, str]) -> int:
        env = {**os.environ, **self.env, **extra_env}
        proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, start_new_session=True,
                                preexec_fn=_ignore_usr2)
        try:
            rc = proc.wait()
        finally:
            _stop_group(proc)
        if rc != 0:  # when Slurm is ending this attempt, its SIGTERM reaches us a moment after the pipeline
            time.sleep(5)  # died of it (or of another task's): leave as _Terminated then, not as a failure
            raise RuntimeError(f"the pipeline exited with {rc}: {' '.join(self.command)}")
        return rc

    # ------------------------------------------------------------------ Ray
    def _ray(self, args: list[str], log: Path, env: dict) -> subprocess.Popen:
        ray_bin = Path(sys.executable).parent / "ray"
        with log.open("a") as out:
            return subprocess.Popen([str(ray_bin) if ray_bin.exists() else "ray", "start", "--block",
                                     "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.cwd, start_new_session=True, preexec_fn=_ignore_usr2)

    def _wait_started(self, proc: subprocess.Popen, log: Path, what: str) -> None:
        deadline = time.monotonic() + self.ray_start_timeout_s
        while RAY_STARTED not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_group(proc)
                raise RuntimeError(f"the Ray {what} did not start in {self.ray_start_timeout_s:g} s "
                                   f"(log {log}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def _node_args(self, ip: str, temp: Path, head: bool) -> list[str]:
        ports = dict(zip(["port", "ray-client-server-port", "dashboard-port", "node-manager-port",
                          "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                          "metrics-export-port", "runtime-env-agent-port"], _free_ports(ip, 9)))
        if not head:
            for key in ("port", "ray-client-server-port", "dashboard-port"):
                ports.pop(key)
        cpus = int(os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count())
        args = [f"--node-ip-address={ip}", f"--num-cpus={cpus}", f"--num-gpus={self.gpus_per_node}",
                f"--temp-dir={temp}", *[f"--{k}={v}" for k, v in ports.items()]]
        return args + ([f"--dashboard-host={ip}"] if head else [])

    def _head_address(self, head_file: Path, done_file: Path, folder: Path) -> dict:
        """What task 0 wrote to `head_file`. Waited for twice the head's start timeout and a
        margin (task 0 may start later than this task, then takes up to that timeout itself),
        or until task 0 gives up (its done file)."""
        wait_s = 2 * self.ray_start_timeout_s + 30
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return json.loads(head_file.read_text())
            except (FileNotFoundError, ValueError):  # not there yet (or, on a shared file system, not whole yet)
                pass
            if done_file.exists() or time.monotonic() > deadline:
                why = "task 0 ended first" if done_file.exists() else f"after {wait_s:g} s"
                raise RuntimeError(f"no Ray head address in {head_file} ({why}): see task 0's log in {folder}")
            time.sleep(0.5)

    def _run_on_ray(self, env, attempt: int) -> int | None:
        folder = Path(env.paths.folder)
        # Named by job id (two jobs may share a slurm.folder without %j) and by attempt (a
        # requeued job starts a new head).
        key = f"{env.job_id}.{attempt}"
        head_file = folder / f"ray_head.{key}.json"
        done_file = folder / f"ray_done.{key}"
        ip = node_ip(env.num_nodes == 1)
        log = folder / f"ray_node.{key}.{env.global_rank}.log"
        temp = _ray_temp(env.job_id, attempt, env.global_rank)
        try:
            if env.global_rank == 0:
                return self._run_head(ip, temp, log, head_file, done_file)
            return self._run_worker(ip, temp, log, head_file, done_file, folder, env.hostname)
        finally:  # after the Ray processes are stopped: they write there until then
            shutil.rmtree(temp, ignore_errors=True)

    def _run_head(self, ip: str, temp: Path, log: Path, head_file: Path, done_file: Path) -> int:
        args = self._node_args(ip, temp, head=True)
        address = f"{ip}:{next(a.split('=')[1] for a in args if a.startswith('--port='))}"
        # RAY_ADDRESS in the nodes' environment too: Ray's own actors that look the cluster up
        # (Ray Train's) would otherwise find every other Ray on the node and refuse to choose.
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": address}
        head = self._ray(["--head", *args], log, {**os.environ, **self.env, **auth})
        try:
            self._wait_started(head, log, "head")
            _write_private(head_file, json.dumps(auth))  # the token is secret
            print(f"[slurm] Ray head at {address} (temp {temp}, log {log})", file=sys.stderr, flush=True)
            return self._run_pipeline(auth)
        finally:
            done_file.touch()
            _stop_group(head, grace_s=1.0)  # nothing runs on it any more: no need to let it drain

    def _run_worker(self, ip: str, temp: Path, log: Path, head_file: Path, done_file: Path, folder: Path,
                    hostname: str) -> None:
        auth = self._head_address(head_file, done_file, folder)
        if done_file.exists():  # task 0's pipeline has already ended: nothing left to join
            return None
        worker = self._ray([f"--address={auth['RAY_ADDRESS']}", *self._node_args(ip, temp, head=False)], log,
                           {**os.environ, **self.env, **auth})
        try:
            self._wait_started(worker, log, f"worker on {hostname}")
            while not done_file.exists() and worker.poll() is None:  # until task 0's pipeline ends
                time.sleep(1.0)
        finally:
            _stop_group(worker, grace_s=1.0)
        return None
