"""`make slurm` on a 2-node Slurm: the local cluster's namespaces (infra/local-cluster/, each
node its own eth0, address and hostname, the hostname on 127.0.1.1 as on a default Debian
host), slurmctld on node 1 and a slurmd on each node (infra/slurm/up.sh --nodes 2, 1 CPU a
node), and an MLflow server on node 1's address. Started once for the module, stopped at the
end; no test sets GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME.

Each job is requeued once mid-run with `scontrol requeue` (after a checkpoint it can resume
from) and must resume into one MLflow run with every step logged once, on both nodes: with the
Ray launcher (the Ray head on node 1, a Ray worker node on node 2; the stage DAG trains on a
Ray Train worker per node and evaluates on Ray actors of both nodes) and with the DDP launcher
(2 nodes x 1 task, each a rank running the same stage DAG, its evaluate stage sharded over
both). Root needed (namespaces)."""
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.local_cluster import ROOT, SOCKET_VARS, LocalCluster, MlflowOnNode
from tests.integration.test_slurm import (Cluster, _alive, committed_checkpoint, finish, job_id_in, submitted,
                                          wait_for_checkpoint)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
                                reason="the local cluster's network namespaces need root, iproute2 and util-linux")

LOSSES: dict[str, list[float]] = {}  # each launcher's loss history, steps 1..30

# 30 short steps, a checkpoint every 10: the requeue lands after the first and before the end.
SMOKE = ["task=gen_digits", "scale=smoke", "poll_s=1", "tracking.register_model=false",
         "tracking.system_metrics=false", "slurm.nodes=2", "slurm.cpus_per_task=1", "train.iterations=30",
         "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def slurm2(request, tmp_path_factory):
    """The local cluster, MLflow on node 1, and Slurm on its 2 nodes; each torn down by what
    started it (down.sh by recorded PIDs and names; the MLflow server by its process group)."""
    cluster = LocalCluster.for_module(2, tag="s")
    state = Path(tempfile.mkdtemp(prefix="lzs-", dir="/tmp"))  # short: munge's socket path lives there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in SOCKET_VARS}
    env["LZN_CLUSTER_DIR"] = str(cluster.state)
    mlflow, pids = None, ""

    def slurm_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "infra/slurm" / name), str(state), *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        cluster.up()
        mlflow = MlflowOnNode(cluster, tmp_path_factory.mktemp("mlflow-slurm2"), 1)
        up = slurm_script("up.sh", "--nodes", "2")
        assert up.returncode == 0, up.stderr[-3000:]
        pids = (state / "pids").read_text()
        again = slurm_script("up.sh", "--nodes", "2", timeout=60)  # idempotent
        assert again.returncode == 0 and "already up" in again.stderr and (state / "pids").read_text() == pids
        env.update({"SLURM_CONF": f"{state}/slurm.conf", "MLFLOW_TRACKING_URI": mlflow.uri,
                    "LZN_DATA_DIR": str(tmp_path_factory.mktemp("data-slurm2")), "OMP_NUM_THREADS": "1"})
        failed_before = request.session.testsfailed
        yield cluster, Cluster(state, env)
        stopped = slurm_script("down.sh", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        started = [line.split() for line in pids.splitlines()]
        assert [(s[0], s[2:]) for s in started] == [("munged", []), ("slurmctld", []), ("slurmd", [cluster.hostname(1)]),
                                                    ("slurmd", [cluster.hostname(2)])]
        assert not [s for s in started if _alive(int(s[1]), s[0])]
        if request.session.testsfailed == failed_before:  # else kept: the daemons' logs are in it
            shutil.rmtree(state, ignore_errors=True)
    finally:
        if (state / "pids").exists():
            slurm_script("down.sh", timeout=120)
        if mlflow is not None:
            mlflow.stop()
        cluster.down()
        shutil.rmtree(cluster.state, ignore_errors=True)


def test_slurm_runs_one_slurmd_per_node_in_its_namespace(slurm2):
    cluster, slurm = slurm2
    nodes = dict(line.split() for line in slurm.run("sinfo", "-h", "-N", "-o", "%N %T").splitlines())
    assert nodes == {cluster.hostname(1): "idle", cluster.hostname(2): "idle"}
    for k in (1, 2):
        shown = slurm.run("scontrol", "show", "node", cluster.hostname(k))
        assert f"NodeAddr={cluster.node_ip(k)} " in shown and "CPUTot=1 " in shown


def requeue_once(slurm: Cluster, ready, proc, log: Path) -> str:
    """`scontrol requeue` once `ready()`, then start the requeued job at once; its id."""
    wait_for_checkpoint(ready, proc, log)
    job_id = job_id_in(log)
    slurm.run("scontrol", "requeue", job_id)
    slurm.release(job_id)
    return job_id


def one_run_every_step_once(slurm: Cluster, run_dir: Path, backend: str, steps: int = 30) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["train/resumed_from_step"]
    assert metrics["train/steps"] == steps and 10 <= resumed < steps and resumed % 10 == 0
    client = MlflowClient(slurm.env["MLFLOW_TRACKING_URI"])  # the server on node 1
    runs = client.search_runs([client.get_experiment_by_name("gen_digits").experiment_id],
                              f"tags.`lzn.run_dir` = '{run_dir}'")
    assert len(runs) == 1  # the requeued attempt continued the first attempt's run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["lzn.backend"] == backend
    assert run.data.metrics["train/resumed_from_step"] == resumed
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in history] == list(range(1, steps + 1))  # none lost, none twice
    assert all(0 < loss < 10 for _, loss in history)
    return {"resumed_from": resumed, "losses": [loss for _, loss in history]}


def worker_nodes(run_dir: Path) -> list[tuple[int, str, str]]:
    """(rank, hostname, ip) of each worker record (the last attempt's)."""
    found = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank-*.json"))]
    return sorted((r["rank"], r["hostname"], r["ip"]) for r in found)


def test_a_ray_job_on_two_nodes_requeued_midway_resumes_into_one_run_on_both_nodes(slurm2, tmp_path):
    cluster, slurm = slurm2
    out, log = tmp_path / "out", tmp_path / "slurm.log"
    run_dir = out / "gen_digits" / "smoke-seed0"
    with submitted(slurm, *SMOKE, f"output_dir={out}", "trainer.num_workers=2", log=log) as proc:
        job_id = requeue_once(slurm, lambda: committed_checkpoint(run_dir), proc, log)
        text = finish(proc, log)

    assert f"Slurm job {job_id} ended COMPLETED" in text and "attempt 2, launcher=ray" in text
    assert "(2 node(s), launcher=ray)" in text
    head = re.findall(r"\[slurm\] Ray head at ([\d.]+):", text)
    assert head == [cluster.node_ip(1)] * 2  # each attempt's head on node 1, at its own address
    worker_log = (run_dir / "slurm" / job_id / f"{job_id}_1_log.err").read_text()  # task 1: node 2
    assert f"task 1/2 on {cluster.hostname(2)}" in worker_log
    # The training workers, one per node (each node has 1 CPU), each at its node's address.
    workers = worker_nodes(run_dir)
    assert [w[0] for w in workers] == [0, 1]
    assert sorted(w[1:] for w in workers) == [(cluster.hostname(1), cluster.node_ip(1)),
                                              (cluster.hostname(2), cluster.node_ip(2))]
    # The evaluate stage of the DAG, on Ray actors of both nodes.
    record = json.loads((run_dir / "pipeline" / "evaluate.json").read_text())
    parts = Path(record["outputs"]["metrics"]["path"]).parent / "parts" / "workers.json"
    assert {w["hostname"] for w in json.loads(parts.read_text()).values()} == {cluster.hostname(1),
                                                                                cluster.hostname(2)}
    found = one_run_every_step_once(slurm, run_dir, "ray")
    LOSSES["ray"] = found["losses"]
    print(f"ray launcher: job {job_id}, resumed from step {found['resumed_from']}, workers {worker_nodes(run_dir)}, "
          f"loss at steps 1 and 30: {found['losses'][0]:.6f} {found['losses'][-1]:.6f}")


def test_a_ddp_job_of_two_nodes_requeued_midway_resumes_into_one_run_on_both_nodes(slurm2, tmp_path):
    cluster, slurm = slurm2
    out, log = tmp_path / "out", tmp_path / "slurm.log"
    run_dir = out / "gen_digits" / "smoke-seed0"
    with submitted(slurm, *SMOKE, f"output_dir={out}", "slurm.launcher=ddp", "slurm.tasks_per_node=1",
                   log=log) as proc:
        # checkpoints/ckpt-*.pt is written atomically: complete once there
        job_id = requeue_once(slurm, lambda: list((run_dir / "checkpoints").glob("ckpt-*.pt")), proc, log)
        text = finish(proc, log)

    assert f"Slurm job {job_id} ended COMPLETED" in text and "attempt 2, launcher=ddp" in text
    task1 = (run_dir / "slurm" / job_id / f"{job_id}_1_log.err").read_text()
    assert "[slurm] torch.distributed rank 0/2" in text and "[slurm] torch.distributed rank 1/2" in task1
    assert f"task 1/2 on {cluster.hostname(2)}" in task1
    # rank r on node r + 1, each at its node's address (the route to MASTER_ADDR, not 127.0.1.1)
    assert worker_nodes(run_dir) == [(0, cluster.hostname(1), cluster.node_ip(1)),
                                     (1, cluster.hostname(2), cluster.node_ip(2))]
    # Both tasks ran the stage DAG: the requeued attempt skipped the prepared data, and the
    # evaluate stage was sharded over the ranks of both nodes.
    assert "[pipeline] prepare: up to date, skipped" in text
    assert set(json.loads(next(run_dir.glob("eval/step-30-*/parts/ranks.json")).read_text()).values()) == {0, 1}
    found = one_run_every_step_once(slurm, run_dir, "local")
    print(f"ddp launcher: job {job_id}, resumed from step {found['resumed_from']}, workers {worker_nodes(run_dir)}, "
          f"loss at steps 1 and 30: {found['losses'][0]:.6f} {found['losses'][-1]:.6f}")
    if "ray" in LOSSES:  # the same 2-rank global batches of (seed, step), requeued and resumed on both
        assert found["losses"] == pytest.approx(LOSSES["ray"], rel=1e-6)
