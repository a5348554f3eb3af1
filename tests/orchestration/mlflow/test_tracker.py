"""MLflow tracking against real `mlflow server` processes on 127.0.0.1: every assertion reads
the values back through MlflowClient. Servers are started through `local_server` and
stopped (or killed, for the outage tests) by their PID."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestration.mlflow import tracker as tracking
from orchestration.mlflow.pending import PENDING_FILE, import_pending
from orchestration.mlflow.runs import RUN_FILE
from orchestration.mlflow.server import local_server, stop_local_server
from orchestration.mlflow.tracker import RunTracker, TrackingConfig, flatten_params, resolve_tracking_uri
from orchestration.run import refused_changes

ROOT = Path(__file__).resolve().parents[3]
CONFIG = {"optim": {"lr": {"encoder": 1e-3, "decoder": 2e-4}, "betas": [0.9, 0.99]}, "steps": 30, "name": "digits"}


pytestmark = pytest.mark.usefixtures("restore_http_env")


@pytest.fixture
def outage(tmp_path_factory):
    """A server of each test's own, which it kills and restarts on the same port: a test that
    fails while the server is down cannot leave the next one without a server."""
    state = tmp_path_factory.mktemp("mlflow-outage")
    uri = local_server(state)
    yield state, uri
    stop_local_server(state)


def _open(uri, run_dir, params=None, **kw):
    return RunTracker.open(uri, "lzn-tracking-tests", run_dir, run_name=Path(run_dir).name,
                           params=flatten_params(CONFIG) if params is None else params,
                           config_yaml="optim:\n  lr: 0.001\n", tags={"lzn.git_commit": "abc123"},
                           refused_changes=refused_changes, system_metrics=False, flush_every_s=kw.pop("flush_every_s", 0.2), **kw)


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _healthy(uri):
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _pid_running(pid):
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_server(state):
    """SIGKILL the server's process group, by the pid in server.json: an outage, not a stop."""
    pid = json.loads((state / "server.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_running(pid)


def _record_calling_threads(tracker):
    """Wrap the tracker's MLflow client so each request records the thread that made it."""
    callers = set()

    class Recording:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            attr = getattr(self._client, name)
            if not callable(attr):
                return attr

            def call(*args, **kwargs):
                callers.add(threading.current_thread())
                return attr(*args, **kwargs)
            return call

    tracker._client = Recording(tracker._client)
    return callers


def test_flatten_params_names_nested_keys_with_dots():
    assert flatten_params(CONFIG) == {"optim.lr.encoder": "0.001", "optim.lr.decoder": "0.0002",
                                      "optim.betas": "[0.9, 0.99]", "steps": "30", "name": "digits"}


def test_resolve_tracking_uri_prefers_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999/")
    assert resolve_tracking_uri(TrackingConfig(uri="http://10.0.0.1:5000"), tmp_path) == "http://10.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5999"
    with pytest.raises(ValueError, match="file:///tmp/mlruns"):
        resolve_tracking_uri(TrackingConfig(uri="file:///tmp/mlruns"), tmp_path)


def test_local_server_is_shared_reused_and_stopped_by_pid(tmp_path, monkeypatch, capsys):
    state = tmp_path / "out" / "mlflow"
    # Two commands starting at once: the file lock gives them one server.
    cli = [sys.executable, "-m", "orchestration.mlflow.tracker", "server", "--dir", str(state)]
    procs = [subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    uris = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    info = json.loads((state / "server.json").read_text())
    assert uris == [info["uri"]] * 2 and _healthy(info["uri"])
    assert local_server(state) == info["uri"]
    assert json.loads((state / "server.json").read_text())["pid"] == info["pid"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path / "out") == info["uri"]
    assert "Started" not in capsys.readouterr().out  # reused, so nothing to announce

    assert stop_local_server(state) is True
    assert not _pid_running(info["pid"]) and not _healthy(info["uri"])
    assert not (state / "server.json").exists()
    assert stop_local_server(state) is False


def test_run_tracker_logs_params_config_tags_and_metrics(server, tmp_path):
    client = MlflowClient(server)
    with _open(server, tmp_path / "run-a") as t:
        assert t.last_logged_step == 0
        for step in range(1, 401):  # 1200 metrics: more than one LogBatch request (limit 1000)
            t.on_log(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "grad_norm": float(step % 7)})
        t.log_metrics({"fid": 12.5, "accuracy": torch.tensor(0.875), "probe": "linear", "classes": [0, 1]}, step=400)
        t.on_checkpoint(400, tmp_path / "run-a" / "ckpt-400.pt")
        assert t.flush(timeout_s=30)
        assert t.seconds_logging > 0
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params == flatten_params(CONFIG)
    assert run.data.tags["lzn.git_commit"] == "abc123"
    assert run.data.tags["mlflow.runName"] == "run-a"
    assert (run.data.tags["probe"], run.data.tags["classes"]) == ("linear", "[0, 1]")
    assert run.data.tags["lzn.last_checkpoint"] == str(tmp_path / "run-a" / "ckpt-400.pt")
    assert run.data.tags["lzn.last_checkpoint_step"] == "400"
    assert _history(client, t.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 401)]
    assert _history(client, t.run_id, "grad_norm") == [(s, float(s % 7)) for s in range(1, 401)]
    assert _history(client, t.run_id, "lr") == [(s, 1e-3 * s) for s in range(1, 401)]
    assert _history(client, t.run_id, "fid") == [(400, 12.5)]
    assert _history(client, t.run_id, "accuracy") == [(400, 0.875)]
    (tmp_path / "dl").mkdir()
    config = Path(client.download_artifacts(t.run_id, "config.yaml", str(tmp_path / "dl")))
    assert config.read_text() == "optim:\n  lr: 0.001\n"
    assert json.loads((tmp_path / "run-a" / RUN_FILE).read_text()) == {
        "run_id": t.run_id, "experiment_id": run.info.experiment_id, "uri": server}


def test_resumed_run_continues_without_duplicate_steps(server, tmp_path):
    client = MlflowClient(server)
    first = _open(server, tmp_path / "run-b")
    for step in range(1, 11):
        first.on_log(step, {"loss": float(step)})
    first.close(status="FAILED")  # a worker died after step 10; its checkpoint is at step 5
    assert client.get_run(first.run_id).info.status == "FAILED"

    second = _open(server, tmp_path / "run-b")
    assert second.run_id == first.run_id and second.last_logged_step == 10
    assert client.get_run(second.run_id).info.status == "RUNNING"
    for step in range(6, 16):  # recomputed from the checkpoint: 6..10 were logged already
        second.on_log(step, {"loss": step + 0.5})
    second.close()
    assert _history(client, first.run_id, "loss") == [(s, float(s)) for s in range(1, 11)] + \
        [(s, s + 0.5) for s in range(11, 16)]
    assert client.get_run(first.run_id).info.status == "FINISHED"

    with pytest.raises(ValueError, match=r"optim\.lr\.encoder: '0\.001' -> '0\.01'"):
        _open(server, tmp_path / "run-b", params={**flatten_params(CONFIG), "optim.lr.encoder": "0.01"})


@pytest.mark.parametrize("error, status", [
    (None, "FINISHED"),
    (SystemExit(0), "KILLED"),  # how Ray Train's session ends a trial that Tune's scheduler stops
    (KeyboardInterrupt(), "KILLED"),
    (SystemExit(1), "FAILED"),
    (FloatingPointError("loss is nan"), "FAILED"),
])
def test_a_run_stopped_from_outside_ends_killed_and_one_that_fails_ends_failed(server, tmp_path, error, status):
    with pytest.raises(type(error)) if error is not None else contextlib.nullcontext():
        with _open(server, tmp_path / "run") as t:
            t.on_log(1, {"loss": 1.0})
            if error is not None:
                raise error
    run = MlflowClient(server).get_run(t.run_id)
    assert run.info.status == status and _history(MlflowClient(server), t.run_id, "loss") == [(1, 1.0)]


def test_server_outage_mid_run_buffers_and_delivers_every_step_once(outage, tmp_path, capsys, monkeypatch):
    state, uri = outage
    port = json.loads((state / "server.json").read_text())["port"]
    monkeypatch.setattr(tracking, "MAX_BUFFERED", 20)  # so the outage also spills to the pending file
    client = MlflowClient(uri)
    t = _open(uri, tmp_path / "run-c")
    for step in range(1, 6):
        t.on_log(step, {"loss": float(step)})
    assert t.flush(timeout_s=30)

    _kill_server(state)
    callers = _record_calling_threads(t)
    for step in range(6, 31):
        t.on_log(step, {"loss": float(step)})
        time.sleep(0.02)  # a few flush periods pass while the server is down
    # A flush period finds more than 20 metrics buffered and spills them; how soon depends on
    # how long the refused request took on this machine, so wait for it (bounded).
    deadline = time.monotonic() + 30
    while not (tmp_path / "run-c" / PENDING_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run-c" / PENDING_FILE).exists()
    for step in range(31, 36):
        t.on_log(step, {"loss": float(step)})
    # Training never waits on the dead server: every request went from the flush thread.
    assert callers and threading.current_thread() not in callers, callers
    assert not t.flush(timeout_s=10)
    err = capsys.readouterr().err
    assert err.count(f"MLflow server {uri} unreachable: buffering") == 1, err
    assert "retrying every 0.2s" in err

    assert local_server(state, port=port) == uri
    assert t.flush(timeout_s=30)
    err = capsys.readouterr().err
    assert re.search(r"reachable again: delivered \d+ buffered metrics", err), err
    assert not (tmp_path / "run-c" / PENDING_FILE).exists()
    t.close()
    assert _history(client, t.run_id, "loss") == [(s, float(s)) for s in range(1, 36)]
    assert client.get_run(t.run_id).info.status == "FINISHED"


def test_close_during_outage_keeps_metrics_for_import(outage, tmp_path, capsys):
    state, uri = outage
    port = json.loads((state / "server.json").read_text())["port"]
    client = MlflowClient(uri)
    trackers = {name: _open(uri, tmp_path / name) for name in ("run-d", "run-e")}
    for t in trackers.values():
        for step in range(1, 4):
            t.on_log(step, {"loss": float(step)})
        assert t.flush(timeout_s=30)

    _kill_server(state)
    for t in trackers.values():
        for step in range(4, 9):
            t.on_log(step, {"loss": float(step)})
        t.log_metrics({"accuracy": 0.75, "split": "test"}, step=8)
        t.on_checkpoint(8, "ckpt-8.pt")
        start = time.monotonic()
        t.close()
        assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    for name, t in trackers.items():
        pending = tmp_path / name / PENDING_FILE
        assert f"kept 6 metrics and 3 tags of run {t.run_id} in {pending}" in err
        assert f"python -m orchestration.mlflow.tracker import {pending}" in err
        lines = [json.loads(line) for line in pending.read_text().splitlines()]
        assert len(lines) == 10 and {r["run_id"] for r in lines} == {t.run_id}
        assert lines[-1]["status"] == "FINISHED"  # set_terminated failed too: kept for import

    assert local_server(state, port=port) == uri
    d, e = trackers["run-d"], trackers["run-e"]
    assert [client.get_run(t.run_id).info.status for t in (d, e)] == ["RUNNING"] * 2
    assert import_pending(tmp_path / "run-d" / PENDING_FILE) == 9  # the command-line path
    reopened = _open(uri, tmp_path / "run-e")  # a rerun of the command delivers on open
    assert reopened.run_id == e.run_id and reopened.last_logged_step == 8
    assert client.get_run(e.run_id).info.status == "RUNNING"  # the imported FINISHED came first
    reopened.close()
    for name, t in trackers.items():
        assert not (tmp_path / name / PENDING_FILE).exists()
        assert _history(client, t.run_id, "loss") == [(s, float(s)) for s in range(1, 9)]
        assert _history(client, t.run_id, "accuracy") == [(8, 0.75)]
        tags = client.get_run(t.run_id).data.tags
        assert [tags["split"], tags["lzn.last_checkpoint"], tags["lzn.last_checkpoint_step"]] == \
            ["test", "ckpt-8.pt", "8"]
        assert client.get_run(t.run_id).info.status == "FINISHED"


def test_a_resumed_run_may_change_how_long_and_where_it_runs_but_not_what_it_trains(tmp_path):
    from types import SimpleNamespace

    from orchestration.mlflow.runs import resume_changes

    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"),
                          data=SimpleNamespace(params={"train.iterations": "2", "trainer.num_workers": "1",
                                                       "optim.lr.encoder": "0.001", "backend": "local"}))
    changed = resume_changes(run, {"train.iterations": "4", "trainer.num_workers": "2", "backend": "ray",
                                   "optim.lr.encoder": "0.001", "new.key": "x"}, tmp_path / "mlflow_run.json",
                             refused_changes)
    assert changed == {"train.iterations": "4", "trainer.num_workers": "2", "backend": "ray"}
    with pytest.raises(ValueError, match=r"optim\.lr\.encoder: '0\.001' -> '0\.01'.*another run_name="):
        resume_changes(run, {"optim.lr.encoder": "0.01", "train.iterations": "9"}, tmp_path / "mlflow_run.json",
                       refused_changes)
