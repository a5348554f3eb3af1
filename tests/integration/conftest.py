"""A real Ray head on 127.0.0.1 for the integration tests, stopped by its process group."""
import os
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


@pytest.fixture(scope="session")
def ray_address():
    """`ray start --head --block` in its own session: killing that process group stops exactly
    the Ray processes this fixture started (never `ray stop`, which stops every Ray here)."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="lzn-ray-"))  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).parent / "ray"
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        probe = subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if head.poll() is not None or time.time() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"the Ray head did not start:\n{(temp / 'head.log').read_text()[-3000:]}")
        time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    log.close()
