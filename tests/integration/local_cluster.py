"""The local multi-node cluster (infra/local-cluster/) from Python, for the tests.

`LocalCluster(state_dir, n, name=..., subnet=...)`: `up()` / `down()` run up.sh / down.sh;
`run_on(k, argv)` / `popen_on(k, argv)` run a command on node k (exec.sh); `kill_node(k)`
loses node k. Each test module brings up its own cluster, with a name and subnet of its own
(`for_module`) so that two modules, or two people's test runs, can be up at once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "infra" / "local-cluster"


class LocalCluster:
    def __init__(self, state_dir: str | Path, n: int, *, name: str = "lzn", subnet: str = "10.213.0",
                 ray: bool = False):
        self.state, self.n, self.name, self.subnet, self.ray = Path(state_dir), n, name, subnet, ray

    @classmethod
    def for_module(cls, n: int, *, ray: bool = False, tag: str = "t") -> "LocalCluster":
        """A cluster of its own: a short state folder in /tmp (Ray's socket paths are limited),
        the name `lz<tag><k>` and a subnet 10.214.<k>.0/24, k from this process id and the tag."""
        if not (tag.isalpha() and tag.islower() and len(tag) <= 3):
            raise ValueError(f"tag={tag!r}: expected 1 to 3 lower-case letters (link names are short)")
        k = (os.getpid() * 7 + sum(map(ord, tag))) % 250 + 1
        state = tempfile.mkdtemp(prefix=f"lzc{tag}-", dir="/tmp")
        return cls(state, n, name=f"lz{tag}{k}", subnet=f"10.214.{k}", ray=ray)

    # --- names and addresses (as infra/local-cluster/common.sh makes them) --------------------
    @property
    def gateway(self) -> str:
        """This machine's address on the cluster's bridge, reachable from every node."""
        return f"{self.subnet}.1"

    def node_ip(self, k: int) -> str:
        return f"{self.subnet}.{10 + k}"

    def hostname(self, k: int) -> str:
        return f"{self.name}-node{k}"

    def netns(self, k: int) -> str:
        return f"{self.name}-node{k}"

    @property
    def bridge(self) -> str:
        return f"{self.name}br0"

    # --- the scripts -----------------------------------------------------------------------
    def _env(self, base: dict | None = None) -> dict:
        """`base` (default: this process's environment) and where the cluster's state is."""
        return {**(os.environ if base is None else base), "LZN_CLUSTER_DIR": str(self.state),
                "LZN_CLUSTER_NAME": self.name, "LZN_CLUSTER_SUBNET": self.subnet}

    def script(self, name: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, env=self._env(),
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def up(self) -> subprocess.CompletedProcess:
        return self.script("up.sh", str(self.n), str(self.state), *(["--ray"] if self.ray else []))

    def down(self) -> subprocess.CompletedProcess:
        return self.script("down.sh", str(self.state))

    def kill_node(self, k: int) -> subprocess.CompletedProcess:
        return self.script("kill-node.sh", str(k), str(self.state))

    def on(self, k: int, argv: list[str]) -> list[str]:
        """argv run on node k."""
        return [str(SCRIPTS / "exec.sh"), str(k), *argv]

    def run_on(self, k: int, argv: list[str], *, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.on(k, argv), env=self._env(env), **kw)

    def popen_on(self, k: int, argv: list[str], *, env: dict | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.on(k, argv), env=self._env(env), **kw)

    # --- Ray --------------------------------------------------------------------------------
    def ray_env(self) -> dict:
        """What a Ray client needs (RAY_ADDRESS, the Jobs API, the token), from up.sh's ray.env."""
        lines = (self.state / "ray.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def ray_nodes(self) -> list[dict]:
        """The alive Ray nodes as the head sees them: [{"ip":, "node_id":, "cpus":}]."""
        code = ("import json, ray; ray.init(logging_level='ERROR'); print(json.dumps([{'ip': n['NodeManagerAddress'], "
                "'node_id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | self.ray_env()
        done = self.run_on(1, [sys.executable, "-c", code], env=env, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray.nodes() failed:\n{done.stderr[-3000:]}")
        import json

        return json.loads(done.stdout.strip().splitlines()[-1])


class MlflowOnNode:
    """`mlflow server` (SQLite, served artifacts) on node k, bound to its address, so that
    every node and this machine reach it and the traffic stays inside the cluster. Stopped by
    its process group (the process this object started)."""

    def __init__(self, cluster: LocalCluster, state: Path, k: int = 1, port: int = 5000):
        self.uri = f"http://{cluster.node_ip(k)}:{port}"
        state.mkdir(parents=True, exist_ok=True)
        self.log = (state / "mlflow.log").open("w")
        self.proc = cluster.popen_on(k, [sys.executable, "-m", "mlflow", "server", "--host", cluster.node_ip(k),
                                         "--port", str(port), "--workers", "1",
                                         "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                                         "--artifacts-destination", str(state / "artifacts")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server on node {k} did not start:\n{(state / 'mlflow.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


SOCKET_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class RayCluster:
    """What a test module's 2-node Ray cluster offers its tests: the nodes, Ray, and an MLflow
    server on node 1 (`tests/integration/test_multinode.py`'s module fixture makes one)."""

    def __init__(self, cluster: LocalCluster, mlflow: MlflowOnNode):
        self.cluster, self.mlflow = cluster, mlflow

    def env(self, out: Path, **extra) -> dict:
        """A driver's environment: this one without any Ray address, token or socket interface
        of its own, plus the cluster's Ray variables, its MLflow and a data folder under `out`."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in SOCKET_VARS}
        return {**base, **self.cluster.ray_env(), "MLFLOW_TRACKING_URI": self.mlflow.uri,
                "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1", **extra}

    def pipeline(self, module: str, overrides: list[str], out: Path, *, node: int = 1, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
        """`python -m <module> output_dir=<out> <overrides>` on `node`, as a user on that node runs it."""
        argv = [sys.executable, "-m", module, f"output_dir={out}", *overrides]
        done = self.cluster.run_on(node, argv, env=env or self.env(out), cwd=ROOT, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{module} on node {node} failed ({done.returncode}):\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def start(self, module: str, overrides: list[str], out: Path, *, node: int = 1,
              env: dict | None = None) -> subprocess.Popen:
        """The same in the background, its output in out/driver-<ns>.log (`proc.log_path`)."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"driver-{time.time_ns()}.log"
        with path.open("w") as log:
            proc = self.cluster.popen_on(node, [sys.executable, "-m", module, f"output_dir={out}", *overrides],
                                         env=env or self.env(out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = path
        return proc
