"""One system-metrics monitor per node (`NodeMetricsMonitor`) against a real `mlflow server`
on 127.0.0.1: each node's samples land in the run that the run folder's mlflow_run.json
names, under system/<node id>/, read back through MlflowClient. GPUs are sampled through
NVML when nvidia-ml-py finds a driver; without one (or without the package) only they are
missing."""
import json
import sys
import time

import pytest
from mlflow import MlflowClient

from lzn.atomic import write_atomically
from orchestration.folder import RunFolder
from orchestration.mlflow.node_metrics import NodeMetricsMonitor

CPU = "cpu_utilization_percentage"  # what MLflow's CPU monitor logs on every machine
WAIT_S = 120.0  # a bound on waiting for samples on a loaded machine, not a timing assertion


@pytest.fixture(autouse=True)
def mlflow_defaults(monkeypatch):
    """MLflow's variables override the node id and the sampling period: not in these tests."""
    for name in ("MLFLOW_SYSTEM_METRICS_NODE_ID", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
                 "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(name, raising=False)


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def _new_run(client, name):
    experiment = client.get_experiment_by_name("lzn-node-metrics") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("lzn-node-metrics")
    return client.create_run(experiment_id, run_name=name).info.run_id


def _record(run_dir, uri, run_id):
    """What rank 0's RunTracker writes when it opens the run."""
    path = RunFolder(run_dir).mlflow_run
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(json.dumps({"run_id": run_id, "uri": uri}).encode()))


def _wait_for(client, run_id, keys):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        logged = set(client.get_run(run_id).data.metrics)
        if set(keys) <= logged:
            return logged
        time.sleep(0.2)
    pytest.fail(f"{sorted(set(keys) - logged)} not logged within {WAIT_S:g} s; logged: {sorted(logged)}")


def _monitor(run_dir, uri, node):
    return NodeMetricsMonitor(run_dir, uri, node, every_s=0.2, poll_s=0.1)


def test_two_nodes_log_to_one_run_under_their_node_ids(server, tmp_path):
    client = MlflowClient(server)
    run_id = _new_run(client, "two-nodes")
    _record(tmp_path, server, run_id)
    with _monitor(tmp_path, server, "node-a"), _monitor(tmp_path, server, "node-b"):
        _wait_for(client, run_id, [f"system/node-a/{CPU}", f"system/node-b/{CPU}"])
    logged = set(client.get_run(run_id).data.metrics)
    assert all(k.startswith(("system/node-a/", "system/node-b/")) for k in logged), sorted(logged)
    # The same metrics from each node: one monitor's set of keys, under two prefixes.
    a = {k.removeprefix("system/node-a/") for k in logged if k.startswith("system/node-a/")}
    b = {k.removeprefix("system/node-b/") for k in logged if k.startswith("system/node-b/")}
    assert a == b and CPU in a
    gpu = {k for k in a if k.startswith("gpu_")}
    if _nvml_works():
        assert "gpu_0_utilization_percentage" in gpu, sorted(a)
    else:
        assert not gpu, sorted(gpu)  # no driver here: the GPU monitor is skipped, nothing crashes


def test_without_nvidia_ml_py_a_node_logs_all_but_its_gpus(server, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)  # as if the package were not installed
    client = MlflowClient(server)
    run_id = _new_run(client, "no-nvml")
    _record(tmp_path, server, run_id)
    with _monitor(tmp_path, server, "node-c"):
        _wait_for(client, run_id, [f"system/node-c/{CPU}"])
    assert not [k for k in client.get_run(run_id).data.metrics if "gpu" in k]


def test_a_node_waits_for_rank_0_to_open_the_run(server, tmp_path):
    """A worker's monitor starts before rank 0 writes mlflow_run.json, and a resumed run's
    file names a run that is not RUNNING until rank 0 reopens it: it samples once it is."""
    client = MlflowClient(server)
    with _monitor(tmp_path, server, "node-d") as monitor:
        run_id = _new_run(client, "resumed")
        client.set_terminated(run_id, "FAILED")  # the previous attempt's status
        _record(tmp_path, server, run_id)
        client.update_run(run_id, status="RUNNING")  # what RunTracker.open does on resume
        _wait_for(client, run_id, [f"system/node-d/{CPU}"])
        assert monitor.run_id == run_id


def test_a_monitor_that_mlflow_stopped_is_started_again_while_the_run_runs(server, tmp_path):
    """MLflow's monitor thread ends for good at its first failed request (a server outage):
    the node starts a new one, which continues the run's sample count."""
    client = MlflowClient(server)
    run_id = _new_run(client, "restarted")
    _record(tmp_path, server, run_id)
    key = f"system/node-e/{CPU}"
    with _monitor(tmp_path, server, "node-e") as monitor:
        _wait_for(client, run_id, [key])
        first = monitor._monitor
        first.finish()  # its thread has ended, as after a failed request
        deadline = time.monotonic() + WAIT_S
        while monitor._monitor is first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert monitor._monitor is not first
        before = max(m.step for m in client.get_metric_history(run_id, key))
        while time.monotonic() < deadline and max(m.step for m in client.get_metric_history(run_id, key)) <= before:
            time.sleep(0.2)
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert len(steps) == len(set(steps)) and max(steps) > before  # new samples, no step logged twice


def test_in_a_multi_process_run_each_nodes_local_rank_0_monitors_and_rank_0s_tracker_does_not(server, tmp_path):
    import socket

    from orchestration.run import RunMeta, node_metrics

    meta = RunMeta(tracking_uri=server)
    assert meta.tracking.system_metrics
    trained_with, none = node_metrics(meta, tmp_path, local_rank=1)
    assert none is None and not trained_with.tracking.system_metrics  # node 0's sampler is its local rank 0's
    trained_with, monitor = node_metrics(meta, tmp_path, local_rank=0)
    try:
        assert not trained_with.tracking.system_metrics and monitor.node_id == socket.gethostname()
        assert meta.tracking.system_metrics  # the caller's meta is not changed
    finally:
        monitor.stop()
    untracked = RunMeta(tracking_uri=None)
    assert node_metrics(untracked, tmp_path, 0) == (untracked, None)
