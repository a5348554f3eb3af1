"""Multi-node for real on this machine: a 2-node local cluster (infra/local-cluster/, network
namespaces, each node its own eth0, address and hostname, the hostname on 127.0.1.1 as on a
default Debian host) with the Ray head on node 1 and a Ray worker node on node 2, 1 CPU each,
and an MLflow server on node 1 bound to its address. Started once for the module
(`ray_cluster`, reusable by every test here), stopped at the end.

No test sets GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME: the workers pick their interface
(orchestration.network). Root needed (namespaces). About 4 minutes on 2 loaded cores.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import make_command
from tests.integration.local_cluster import ROOT, SOCKET_VARS, LocalCluster, MlflowOnNode, RayCluster
from tests.integration.test_ray_train import losses

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
                                reason="the local cluster's network namespaces need root, iproute2 and util-linux")

# 12 deterministic steps: the batches of a step are a function of (seed, step), whatever the
# number of workers, so 2 workers on 2 nodes must follow one process.
RUN = ["task=gen_digits", "scale=smoke", "train.deterministic=true", "train.batch_size=16", "train.iterations=12",
       "train.checkpoint_every=6", "tracking.register_model=false"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = LocalCluster.for_module(2, ray=True, tag="m")
    mlflow = None
    try:
        cluster.up()
        mlflow = MlflowOnNode(cluster, tmp_path_factory.mktemp("mlflow-multinode"), 1)
        yield RayCluster(cluster, mlflow)
    finally:
        if mlflow is not None:
            mlflow.stop()
        cluster.down()
        shutil.rmtree(cluster.state, ignore_errors=True)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank-*.json"))]


def assert_one_worker_per_node(rc: RayCluster, run_dir: Path, world: int = 2) -> list[dict]:
    """The worker records name the 2 nodes: each its own IP, Ray node id, hostname and pid."""
    found = records(run_dir)
    nodes = {n["ip"]: n["node_id"] for n in rc.cluster.ray_nodes()}
    c = rc.cluster
    assert sorted(r["rank"] for r in found) == list(range(world)) and {r["world"] for r in found} == {world}
    assert sorted(r["ip"] for r in found) == [c.node_ip(1), c.node_ip(2)], found
    assert sorted(r["hostname"] for r in found) == [c.hostname(1), c.hostname(2)], found
    assert all(nodes[r["ip"]] == r["node_id"] for r in found), (found, nodes)  # Ray's own id of that node
    assert len({r["pid"] for r in found}) == 2
    return found


def test_two_nodes_whose_hostnames_resolve_to_loopback_and_no_interface_is_set(ray_cluster):
    c = ray_cluster.cluster
    nodes = c.ray_nodes()
    assert sorted((n["ip"], n["cpus"]) for n in nodes) == [(c.node_ip(1), 1.0), (c.node_ip(2), 1.0)]
    code = "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))"
    for k in (1, 2):
        done = c.run_on(k, [sys.executable, "-c", code], check=True)
        assert done.stdout.split() == [c.hostname(k), "127.0.1.1"]  # the case that sent Gloo to loopback
    # Nor do the Ray processes carry one: their workers choose.
    for line in (c.state / "pids").read_text().splitlines():
        pid = int(line.split()[2])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.split(b"=")[0].decode() in SOCKET_VARS], line


def test_ray_train_on_two_nodes_follows_one_process_and_records_both_nodes(ray_cluster, tmp_path):
    rc, c = ray_cluster, ray_cluster.cluster
    env = rc.env(tmp_path, RAY_DEDUP_LOGS="0")  # Ray folds lines that differ only in numbers (the IPs)
    assert not set(SOCKET_VARS) & set(env)
    done = rc.pipeline("pipelines.train", [*RUN, "backend=ray", "trainer.num_workers=2", "run_name=two"], tmp_path,
                       env=env)
    two = tmp_path / "gen_digits" / "two"
    assert_one_worker_per_node(rc, two)
    # Each worker said once which interface it took: its node's eth0, from its Ray node IP.
    log = done.stdout + done.stderr
    for k in (1, 2):
        said = re.findall(rf"GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0: the interface of {re.escape(c.node_ip(k))}, "
                          r"this worker's Ray node IP", log)
        assert len(said) == 1, (k, log[-3000:])

    rc.pipeline("pipelines.train", [*RUN, "backend=local", "run_name=one"], tmp_path, env=env)
    one = losses(tmp_path / "gen_digits" / "one")
    assert len(one) == 12
    assert losses(two) == pytest.approx(one, rel=1e-6)

    client = MlflowClient(rc.mlflow.uri)
    run_id = json.loads((two / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(history) == list(range(1, 13)) and [history[s] for s in range(1, 13)] == pytest.approx(one, rel=1e-6)


def test_make_submit_to_the_two_node_jobs_api(ray_cluster, tmp_path):
    """From this machine, as to a remote cluster: its Jobs API on node 1's address, the
    project uploaded, the interpreter named (the nodes share this filesystem), the run folder
    on the shared storage."""
    rc, c = ray_cluster, ray_cluster.cluster
    args = ["task=gen_digits", "scale=smoke", "trainer.num_workers=2", "run_name=job", "tracking.register_model=false",
            f"output_dir={tmp_path}", f"python={sys.executable}"]
    done = subprocess.run(make_command("submit", *args), cwd=ROOT, capture_output=True, text=True,
                          env=rc.env(tmp_path), timeout=600)
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    job_id = re.search(r"^submission id: (\S+)$", out, re.M).group(1)
    assert re.search(rf"^submitted to http://{re.escape(c.node_ip(1))}:8265: ", out, re.M), out[:2000]
    assert out.rstrip().endswith(f"job {job_id} SUCCEEDED")
    run_dir = tmp_path / "gen_digits" / "job"
    assert_one_worker_per_node(rc, run_dir)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(rc.mlflow.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


# One rank per node, as Slurm's DDP launcher (submitit) or torchrun start them: MASTER_ADDR is
# node 1's hostname, which is 127.0.1.1 on node 1 itself. pick=1 goes through the trainer's
# own start (pipelines.stages.train._init_distributed), pick=0 calls init_process_group bare.
RANK_CODE = """
import datetime, json, os, sys
import torch, torch.distributed as dist
if sys.argv[1] == "1":
    from pipelines.stages.train import _init_distributed
    _init_distributed(torch.device("cpu"))
else:
    # The store waits for rank 0 as long as a busy machine needs; Gloo's own connect, 10 s.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), 2, os.environ["RANK"] == "0",
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=int(os.environ["RANK"]), world_size=2,
                            timeout=datetime.timedelta(seconds=10))
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x)
from orchestration.network import node_identity
print(json.dumps({"sum": x.item(), "gloo": os.environ.get("GLOO_SOCKET_IFNAME"), "ip": node_identity().get("ip")}))
"""


def ranks_on_both_nodes(c: LocalCluster, pick: str, port: int) -> list[subprocess.CompletedProcess]:
    base = {k: v for k, v in os.environ.items() if k not in SOCKET_VARS}
    procs = []
    for rank in (0, 1):
        env = {**base, "MASTER_ADDR": c.hostname(1), "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
        procs.append(c.popen_on(rank + 1, [sys.executable, "-c", RANK_CODE, pick], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_ddp_ranks_on_two_nodes_connect_over_eth0_where_bare_gloo_goes_to_loopback(ray_cluster):
    c = ray_cluster.cluster
    bare = ranks_on_both_nodes(c, "0", 29611)
    errors = "".join(d.stderr for d in bare)
    assert any(d.returncode != 0 for d in bare), errors[-2000:]  # the failure, reproduced on this cluster
    assert "Gloo connectFullMesh failed" in errors and "remote=[127.0.1.1]" in errors, errors[-3000:]
    picked = ranks_on_both_nodes(c, "1", 29612)
    assert [d.returncode for d in picked] == [0, 0], [d.stderr[-2000:] for d in picked]
    results = [json.loads(d.stdout.strip().splitlines()[-1]) for d in picked]
    assert results == [{"sum": 3.0, "gloo": "eth0", "ip": c.node_ip(k)} for k in (1, 2)]  # what each rank records
    assert "this node's route out (MASTER_ADDR=" in picked[0].stdout  # rank 0: its own name is loopback
    assert f"the interface of {c.node_ip(2)}, this node's address towards MASTER_ADDR={c.hostname(1)}" \
        in picked[1].stdout
