"""infra/slurm/up.sh's refusals of bad input, before it makes or starts anything (the cluster it
brings up runs in tests/integration/test_slurm.py, one node, and test_multinode_slurm.py, 2
nodes of the local cluster). Root needed: up.sh refuses to run without it."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "infra" / "slurm" / "up.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="infra/slurm/up.sh runs as root only")


def up(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(UP), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--nodes", "two"], "--nodes two: expected a number of nodes of the local cluster, 1 to 99"),
    (["--nodes"], "--nodes <missing>: expected a number of nodes"),
    (["--node=2"], "unknown option --node=2; usage: up.sh [STATE_DIR] [--nodes N]"),
    (["/tmp/a", "/tmp/b"], "unexpected argument /tmp/b"),
])
def test_bad_arguments_are_refused_naming_what_was_expected(tmp_path, args, message):
    done = up(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_more_nodes_than_the_local_cluster_has_are_refused_before_anything_is_made(tmp_path):
    cluster, state = tmp_path / "cluster", tmp_path / "slurm"
    cluster.mkdir()
    done = up(str(state), "--nodes", "2", env={"LZN_CLUSTER_DIR": str(cluster)})
    assert done.returncode == 1
    assert (f"--nodes 2 needs a local cluster of at least 2 nodes in {cluster} (it has 0): run "
            f"infra/local-cluster/up.sh 2 {cluster} first") in done.stderr, done.stderr
    assert not state.exists()
