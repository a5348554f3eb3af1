"""Multi-node for real on this machine: a 2-node local cluster (infra/local-cluster/, network
namespaces, each node its own eth0, address and hostname, the hostname on 127.0.1.1 as on a
default Debian host) with the Ray head on node 1 and a Ray worker node on node 2, 1 CPU each,
and an MLflow server on node 1 bound to its address. Started once for the module
(`ray_cluster`, reusable by every test here), stopped at the end.

No test sets GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME: the workers pick their interface
(orchestration.network). Root needed (namespaces). The cluster and the first four tests: 3.6 min
measured on this 2-core machine (11 min while five other test runs shared it).
"""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import make_command
from tests.integration.local_cluster import ROOT, SOCKET_VARS, LocalCluster, MlflowOnNode, RayCluster
from tests.integration.test_ray_train import logged, losses, wait_for_step

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


def start_ranks(c: LocalCluster, pick: str, port: int) -> list[subprocess.Popen]:
    """Rank 0 on node 1 and rank 1 on node 2, no *_SOCKET_IFNAME in their environment."""
    base = {k: v for k, v in os.environ.items() if k not in SOCKET_VARS}
    procs = []
    for rank in (0, 1):
        env = {**base, "MASTER_ADDR": c.hostname(1), "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
        procs.append(c.popen_on(rank + 1, [sys.executable, "-c", RANK_CODE, pick], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_ddp_ranks_on_two_nodes_connect_over_eth0_where_bare_gloo_goes_to_loopback(ray_cluster):
    c = ray_cluster.cluster
    bare, picked = start_ranks(c, "0", 29611), start_ranks(c, "1", 29612)  # at once: they share nothing
    bare, picked = finish(bare), finish(picked)
    errors = "".join(d.stderr for d in bare)
    assert any(d.returncode != 0 for d in bare), errors[-2000:]  # the failure, reproduced on this cluster
    assert "Gloo connectFullMesh failed" in errors and "remote=[127.0.1.1]" in errors, errors[-3000:]
    assert [d.returncode for d in picked] == [0, 0], [d.stderr[-2000:] for d in picked]
    results = [json.loads(d.stdout.strip().splitlines()[-1]) for d in picked]
    assert results == [{"sum": 3.0, "gloo": "eth0", "ip": c.node_ip(k)} for k in (1, 2)]  # what each rank records
    assert "this node's route out (MASTER_ADDR=" in picked[0].stdout  # rank 0: its own name is loopback
    assert f"the interface of {c.node_ip(2)}, this node's address towards MASTER_ADDR={c.hostname(1)}" \
        in picked[1].stdout


# ------------------------------------------------------------------ node loss, sweeps, evaluation
# 60 steps, a checkpoint every 10, elastic down to 1 worker (trainer.min_workers=1): the worker
# node dies past step 30, every process on it at once.
NODE_LOSS = [*RUN, "train.iterations=60", "train.checkpoint_every=10", "train.keep_checkpoints=2"]
KILL_AFTER = 30


@pytest.fixture(scope="module")
def node_loss(ray_cluster, tmp_path_factory):
    """A 2-node elastic run whose worker node is killed mid-run, and node 2 back afterwards for
    the tests after it. (run folder, the last step logged when the node died, the MLflow run id
    before, the driver's log)."""
    rc, c = ray_cluster, ray_cluster.cluster
    out = tmp_path_factory.mktemp("node-loss")
    # One start of the worker group waits 40 s for its resources (Ray's default: 60): the first
    # restart still counts the dead node's CPU until Ray's health check marks the node dead.
    env = rc.env(out, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="40")
    proc = rc.start("pipelines.train", [*NODE_LOSS, "backend=ray", "trainer.num_workers=2", "trainer.min_workers=1",
                                        "run_name=lost"], out, env=env)
    run_dir = out / "gen_digits" / "lost"
    try:
        wait_for_step(run_dir, KILL_AFTER, proc)
        before = records(run_dir)
        assert sorted(r["ip"] for r in before) == [c.node_ip(1), c.node_ip(2)], before  # one worker a node
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        c.kill_node(2)
        killed_at = logged(run_dir)[-1]["step"]  # the survivor waits in a collective with the dead rank
        assert proc.wait(timeout=600) == 0, proc.log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        c.up()  # node 2's Ray again (a new node id): only what is missing is started
    assert sorted(n["ip"] for n in c.ray_nodes()) == [c.node_ip(1), c.node_ip(2)]
    return run_dir, killed_at, run_id, proc.log_path.read_text()


def test_a_lost_worker_node_resumes_on_the_node_that_remains_into_the_same_mlflow_run(ray_cluster, node_loss,
                                                                                      tmp_path):
    rc, c = ray_cluster, ray_cluster.cluster
    run_dir, killed_at, run_id, log = node_loss
    assert f"node {c.node_ip(2)} (" in log and "is gone: Ray Train restarts the run from its last checkpoint" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["train/resumed_from_step"]
    print(f"node loss: worker node killed at step {killed_at}, resumed from step {resumed:g}")
    assert 0 < resumed <= killed_at and resumed % 10 == 0 and metrics["train/steps"] == 60, (resumed, killed_at)
    (record,) = records(run_dir)  # the resumed attempt: the one worker that fits on node 1
    assert (record["rank"], record["world"], record["ip"]) == (0, 1, c.node_ip(1)), record
    # Its losses are one process's: the global batch of a step does not depend on the workers.
    rc.pipeline("pipelines.train", [*NODE_LOSS, "backend=local", "run_name=one", "tracking.enabled=false"], tmp_path)
    one = losses(tmp_path / "gen_digits" / "one")
    assert len(one) == 60 and losses(run_dir) == pytest.approx(one, rel=1e-6)

    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id  # the same MLflow run
    client = MlflowClient(rc.mlflow.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/resumed_from_step"] == resumed
    rows = logged(run_dir)
    keys = {k for row in rows for k in row} - {"step"}
    assert "loss" in keys
    for key in sorted(keys):  # every step once, those logged before the node died and recomputed after too
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [row["step"] for row in rows if key in row], key
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert [history[s] for s in range(1, 61)] == pytest.approx(one, rel=1e-6)


def test_a_sweep_runs_its_trials_on_both_nodes(ray_cluster, tmp_path):
    """4 one-worker trials, 2 at a time (a CPU each, so one a node): the trials' worker records
    name both nodes, each by Ray's own id of it."""
    rc, c = ray_cluster, ray_cluster.cluster
    rc.pipeline("pipelines.sweep", ["task=gen_digits", "scale=smoke", "sweep.num_samples=4", "sweep.name=nodes",
                                    "sweep.scheduler=fifo", "sweep.baseline=false", "train.iterations=2",
                                    "train.checkpoint_every=2", "eval.fid_samples=16", "tracking.register_model=false"],
                tmp_path)
    sweep = tmp_path / "gen_digits" / "sweeps" / "nodes"
    status = {r["trial"]: r["status"] for r in csv.DictReader((sweep / "leaderboard.csv").open())}
    assert len(status) == 4 and len(sorted((sweep / "trials").iterdir())) == 4
    # A trial Ray kills before its worker starts (its memory monitor, on a machine shared with other
    # test runs) errs without a record; the first two start at once, so they are on the two nodes.
    finished = [t for t, s in status.items() if s == "finished"]
    assert len(finished) >= 2, status
    nodes = {n["ip"]: n["node_id"] for n in c.ray_nodes()}
    ran = {}
    for trial in sorted(status):
        found = records(sweep / "trials" / trial)
        assert len(found) <= 1 and (found or trial not in finished), (trial, found)  # one worker a trial
        for record in found:
            assert nodes[record["ip"]] == record["node_id"], (record, nodes)
            ran[trial] = record["ip"]
    print(f"sweep: trials ran on {ran} ({status})")
    assert set(ran.values()) == {c.node_ip(1), c.node_ip(2)}, ran


def test_the_evaluation_stage_shares_its_units_between_actors_on_both_nodes(ray_cluster, node_loss):
    rc, c = ray_cluster, ray_cluster.cluster
    run_dir = node_loss[0]
    done = rc.pipeline("pipelines.evaluate", ["task=gen_digits", "scale=smoke", f"checkpoint={run_dir}", "backend=ray",
                                              "trainer.num_workers=2", "eval.fid_samples=48", "eval.chunk_size=8"],
                       run_dir.parent.parent)
    folder = Path(done.stdout.strip().splitlines()[-1].removeprefix("evaluation folder: "))
    workers = json.loads((folder / "parts" / "workers.json").read_text())  # unit -> where its actor ran
    nodes = {n["ip"]: n["node_id"] for n in c.ray_nodes()}
    by_node = {}
    for unit, where in workers.items():
        assert nodes[where["ip"]] == where["node_id"], (unit, where, nodes)
        by_node.setdefault(where["ip"], []).append(unit)
    print(f"evaluation: units by node {by_node}")
    assert sorted(by_node) == [c.node_ip(1), c.node_ip(2)] and len({w["pid"] for w in workers.values()}) == 2
    assert json.loads((folder / "metrics.json").read_text())["eval/fid_samples"] == 48
