"""infra/local-cluster/: up.sh / exec.sh / kill-node.sh / down.sh on this machine, without Ray
(the Ray part runs in tests/integration/test_multinode.py). Root and iproute2 needed. A few
seconds: the nodes are namespaces, nothing is installed."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.local_cluster import LocalCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
                                reason="network namespaces need root, iproute2 and util-linux")


def host_view(cluster: LocalCluster) -> dict:
    """What of this machine a cluster can change: namespaces, links, mounts, /etc/netns."""
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {"netns": sorted(line.split()[0] for line in out("ip", "netns", "list").splitlines() if line.strip()),
            "links": sorted(line.split()[1].split("@")[0].rstrip(":") for line in out("ip", "-o", "link").splitlines()),
            "mounts": sorted(line for line in out("cat", "/proc/self/mounts").splitlines()
                             if str(cluster.state) in line or "/run/netns" in line),
            "etc": sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []}


def mine(view: dict, cluster: LocalCluster) -> dict:
    """The part of a host view that is this cluster's (others may work on this machine too)."""
    return {"netns": [n for n in view["netns"] if n.startswith(cluster.name + "-")],
            "links": [n for n in view["links"] if n.startswith(cluster.name)],
            "mounts": [m for m in view["mounts"] if str(cluster.state) in m or f"/{cluster.name}-" in m],
            "etc": [e for e in view["etc"] if e.startswith(cluster.name + "-")]}


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster.for_module(3, tag="i")
    before = mine(host_view(c), c)
    assert before == {"netns": [], "links": [], "mounts": [], "etc": []}, before
    c.before = before
    c.up()
    yield c
    c.down()
    shutil.rmtree(c.state, ignore_errors=True)


def test_up_makes_n_nodes_and_a_second_up_changes_nothing(cluster):
    view = mine(host_view(cluster), cluster)
    assert view["netns"] == [f"{cluster.name}-node{k}" for k in (1, 2, 3)]
    assert view["links"] == sorted([cluster.bridge] + [f"{cluster.name}v{k}" for k in (1, 2, 3)])
    assert view["etc"] == [f"{cluster.name}-node{k}" for k in (1, 2, 3)]
    assert len(view["mounts"]) == 3 + 3  # a UTS namespace file per node, and /run/netns/<node>
    records = (cluster.state / "created").read_text()
    again = cluster.up()
    assert mine(host_view(cluster), cluster) == view
    assert (cluster.state / "created").read_text() == records
    assert "up: 3 nodes" in again.stderr
    # Another N is refused while the cluster is up: down first.
    other = cluster.script("up.sh", "2", str(cluster.state), check=False)
    assert other.returncode == 1 and "has 3 nodes, not 2" in other.stderr


def test_each_node_has_its_hostname_on_loopback_and_the_others_by_address(cluster):
    for k in (1, 2, 3):
        code = ("import socket, json; h = socket.gethostname(); "
                "print(json.dumps([h] + [socket.gethostbyname(f'" + cluster.name + "-node{j}') for j in (1, 2, 3)]))")
        done = cluster.run_on(k, [sys.executable, "-c", code], check=True)
        import json

        hostname, *resolved = json.loads(done.stdout)
        assert hostname == cluster.hostname(k)
        expected = [("127.0.1.1" if j == k else cluster.node_ip(j)) for j in (1, 2, 3)]
        assert resolved == expected, (k, resolved)
        addrs = cluster.run_on(k, ["ip", "-o", "-4", "addr", "show", "eth0"], check=True).stdout
        assert f"inet {cluster.node_ip(k)}/24" in addrs
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != cluster.hostname(1)


def test_nodes_reach_each_other_over_tcp_and_not_each_others_loopback(cluster, tmp_path):
    server = ("import socket, sys\n"
              "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind((sys.argv[1], 7077)); s.listen(); print('ready', flush=True)\n"
              "c, peer = s.accept(); c.sendall((socket.gethostname() + ' ' + peer[0]).encode()); c.close()\n")
    client = ("import socket, sys\n"
              "try:\n"
              "    c = socket.create_connection((sys.argv[1], 7077), timeout=5); print(c.recv(100).decode())\n"
              "except OSError as e:\n"
              "    print('refused', type(e).__name__)\n")
    for address in (cluster.node_ip(2), "127.0.0.1"):
        proc = cluster.popen_on(2, [sys.executable, "-c", server, address], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            got = cluster.run_on(1, [sys.executable, "-c", client, address], check=True, timeout=30).stdout.strip()
            if address == "127.0.0.1":  # node 1's loopback is its own: nothing listens there
                assert got.startswith("refused ConnectionRefusedError"), got
            else:
                assert got == f"{cluster.hostname(2)} {cluster.node_ip(1)}"
        finally:
            proc.kill()
            proc.wait()
    # This machine reaches the nodes through the bridge's address.
    route = subprocess.run(["ip", "route", "get", cluster.node_ip(3)], capture_output=True, text=True).stdout
    assert f"dev {cluster.bridge}" in route and f"src {cluster.gateway}" in route


def test_exec_keeps_cwd_and_environment_and_returns_the_status(cluster, tmp_path):
    env = {**os.environ, "LZN_PROBE": "x y"}
    done = cluster.run_on(3, ["sh", "-c", 'pwd; echo "$LZN_PROBE"; exit 7'], env=env, cwd=tmp_path)
    assert done.returncode == 7 and done.stdout.splitlines() == [str(tmp_path), "x y"]
    bad = cluster.run_on(4, ["true"])
    assert bad.returncode == 1 and "node K=4: expected 1 to 3" in bad.stderr


def on_node(c: LocalCluster, k: int, proc: subprocess.Popen) -> None:
    """Wait until `proc` runs inside node k (exec.sh, nsenter and ip exec into it in turn)."""
    deadline = time.time() + 60
    while str(proc.pid) not in subprocess.run(["ip", "netns", "pids", c.netns(k)], capture_output=True,
                                              text=True).stdout.split():
        assert proc.poll() is None and time.time() < deadline, f"pid {proc.pid} never reached node {k}"
        time.sleep(0.05)


def test_kill_node_kills_every_process_on_that_node_only(cluster):
    on2 = [cluster.popen_on(2, ["sleep", "600"]) for _ in range(2)]
    on3 = cluster.popen_on(3, ["sleep", "600"])
    for p in on2:
        on_node(cluster, 2, p)
    on_node(cluster, 3, on3)
    try:
        done = cluster.kill_node(2)
        assert "killed 2 processes" in done.stderr, done.stderr
        assert [p.wait(timeout=10) for p in on2] == [-9, -9]
        time.sleep(0.2)
        assert on3.poll() is None
    finally:
        for p in (*on2, on3):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_name_up_sh_did_not_make_is_refused_and_left_alone(tmp_path):
    c = LocalCluster.for_module(1, tag="f")
    foreign = c.netns(1)
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        done = c.script("up.sh", "1", str(c.state), check=False)
        assert done.returncode == 1 and f"netns {foreign} exists but is not recorded" in done.stderr, done.stderr
        c.down()
        assert foreign in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert mine(host_view(c), c)["links"] == []  # the bridge it made before refusing is gone
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
        shutil.rmtree(c.state, ignore_errors=True)


def test_a_state_folder_writable_by_others_or_a_symlink_is_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    c = LocalCluster(loose, 1, name="lzx", subnet="10.214.251")
    done = c.script("up.sh", "1", str(loose), check=False)
    assert done.returncode == 1 and "has mode 777, writable by group or others" in done.stderr
    link = tmp_path / "link"
    link.symlink_to(loose)
    done = c.script("down.sh", str(link), check=False)
    assert done.returncode == 1 and "is a symlink" in done.stderr
    bad = c.script("up.sh", "0", check=False)
    assert bad.returncode == 2 and "N=0: expected the number of nodes" in bad.stderr


def test_down_removed_exactly_what_up_made():
    """Last in the module: a cluster of its own, up then down, against the host's view."""
    c = LocalCluster.for_module(2, tag="d")
    before = host_view(c)
    c.up()
    assert host_view(c) != before
    proc = c.popen_on(1, ["sleep", "600"])  # a process left on a node is stopped too
    on_node(c, 1, proc)
    c.down()
    try:
        assert proc.wait(timeout=10) != 0
        assert mine(host_view(c), c) == mine(before, c)
        assert not (c.state / "created").exists() and not (c.state / "pids").exists()
        assert c.down().stderr.strip().endswith("nothing to remove: no records in " + str(c.state))
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(c.state, ignore_errors=True)
