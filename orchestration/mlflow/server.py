"""A local MLflow tracking server: started detached under a state folder, reused by later
commands, stopped by the PID it recorded.

`mlflow server` on 127.0.0.1 with a SQLite backend (`<state_dir>/mlflow.db`) and artifacts it
serves itself (`<state_dir>/artifacts`), so every writer logs over HTTP. `server.json` in the
state folder records pid, port and URI; an fcntl lock makes concurrent starters share one
server; a restarted server takes its previous port when free, so stored run URIs stay valid.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from lzn.atomic import write_atomically
from lzn.errors import UserError

SERVER_FILE = "server.json"


def _healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (a server we started and killed in this very
    process stays a zombie until reaped, and `kill(pid, 0)` still succeeds on it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_mlflow_server(pid: int) -> bool:
    """Guard against a recycled pid: the command line must be an mlflow server."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if cmdline.parent.exists():
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        else:  # no /proc (macOS)
            args = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                                  text=True, timeout=5).stdout.split()
        return "mlflow" in args and "server" in args
    return False


def _read_state(state_dir: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((state_dir / SERVER_FILE).read_text())
    return None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """An exclusive flock on <state_dir>/server.lock: two commands starting at once share one server."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def running_server(state_dir: str | Path) -> dict | None:
    """The server.json of the server for `state_dir` if that server runs and answers, else None."""
    info = _read_state(Path(state_dir).resolve())
    if info and _alive(info["pid"]) and _is_mlflow_server(info["pid"]) and _healthy(info["uri"]):
        return info
    return None


def local_server(state_dir: str | Path, *, timeout_s: float = 120, port: int | None = None) -> str:
    """Start, or reuse, a detached MLflow server for `state_dir`; returns its http URI.

    SQLite backend at <state_dir>/mlflow.db, artifacts under <state_dir>/artifacts served by
    the server, log in <state_dir>/server.log, state in <state_dir>/server.json. A new server
    takes `port`, else the port of the previous server of this state_dir when free (so the URI
    stored in runs' mlflow_run.json stays valid), else a free port. It runs in its own session
    so it outlives this command, for later commands and `make ui`.
    """
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        if info := running_server(state_dir):
            if port is not None and port != info["port"]:
                raise UserError(f"an MLflow server for {state_dir} already runs on port {info['port']}, "
                                f"not the requested port {port}; stop it first")
            return info["uri"]
        old = _read_state(state_dir) or {}
        if old and _alive(old["pid"]) and _is_mlflow_server(old["pid"]):
            _terminate(old["pid"], 10.0)  # ours but not answering /health: hung, or half dead
        previous = old.get("port")
        if port is None:
            port = previous if previous and _port_free(previous) else _free_port()
        uri, log = f"http://127.0.0.1:{port}", state_dir / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
               "--artifacts-destination", str(state_dir / "artifacts"), "--workers", "1"]
        # Job execution would start a huey consumer beside the server: not needed to track runs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=state_dir, env=env, start_new_session=True)
        state = {"pid": proc.pid, "port": port, "uri": uri, "log": str(log), "started": time.time(),
                 "backend_store_uri": cmd[cmd.index("--backend-store-uri") + 1]}
        write_atomically(state_dir / SERVER_FILE, lambda f: f.write(json.dumps(state, indent=1).encode()))
        deadline = time.monotonic() + timeout_s
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else \
                    f"did not answer {uri}/health within {timeout_s:.0f}s"
                _signal_group(proc.pid, signal.SIGKILL)
                (state_dir / SERVER_FILE).unlink(missing_ok=True)
                raise RuntimeError(f"MLflow server for {state_dir} {why}; tail of {log}:\n{_log_tail(log)}")
            time.sleep(0.25)
        return uri


def _signal_group(pid: int, sig: int) -> None:
    """Signal the server's process group (it leads one, start_new_session=True): the mlflow CLI
    runs uvicorn as a child, which a signal to the CLI alone would orphan on SIGKILL."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)


def _group_alive(pid: int) -> bool:
    _alive(pid)  # reaps the leader if it is our zombie child
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _terminate(pid: int, grace_s: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pid):
        _signal_group(pid, signal.SIGKILL)
        while _group_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)


def stop_local_server(state_dir: str | Path, grace_s: float = 10.0) -> bool:
    """SIGTERM (SIGKILL after `grace_s`) the server recorded in <state_dir>/server.json, and
    remove that file. False if no server of ours was running."""
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        info = _read_state(state_dir)
        running = bool(info) and _alive(info["pid"]) and _is_mlflow_server(info["pid"])
        if running:
            _terminate(info["pid"], grace_s)
        (state_dir / SERVER_FILE).unlink(missing_ok=True)
        return running
