"""A real Ray head on 127.0.0.1 for the integration tests, stopped by its process group."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parents[2]


def make_command(target: str, *args: str) -> list[str]:
    """The `make` line a user types for a pipeline command's arguments: `task=` becomes TASK,
    `mode=sweep` SWEEP=1 (for `make slurm`), everything else ARGS (no spaces in the values)."""
    task = next(a.split("=", 1)[1] for a in args if a.startswith("task="))
    sweep = "mode=sweep" in args and target == "slurm"
    rest = [a for a in args if not a.startswith("task=") and not (sweep and a == "mode=sweep")]
    assert not any(" " in a for a in rest), rest
    return ["make", "-s", "--no-print-directory", "-C", str(ROOT), target, f"TASK={task}",
            *(["SWEEP=1"] if sweep else []), f"ARGS={' '.join(rest)}"]


class RayHead:
    def __init__(self, address: str, env: dict):
        self.address, self.env = address, env  # env: what a client needs (RAY_ADDRESS, the auth token)


@pytest.fixture(scope="session")
def ray_head():
    """`ray start --head --block` in its own session: killing that process group stops exactly
    the Ray processes this fixture started (never `ray stop`, which stops every Ray here).
    Token authentication on, with a token of its own, as a shared cluster has it."""
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = Path(tempfile.mkdtemp(prefix="lzn-ray-"))  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).parent / "ray"
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", f"--dashboard-agent-listen-port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **auth})
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        probe = subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True, text=True,
                               env={**os.environ, **auth})
        if probe.returncode == 0:
            break
        if head.poll() is not None or time.time() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"the Ray head did not start:\n{(temp / 'head.log').read_text()[-3000:]}")
        time.sleep(1)
    yield RayHead(address, {"RAY_ADDRESS": address, **auth})
    os.killpg(head.pid, signal.SIGTERM)  # Ray would drain for up to 30 s: nothing runs any more
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    log.close()
