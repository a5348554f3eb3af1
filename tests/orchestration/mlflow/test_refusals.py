"""What the MLflow server refuses is never dropped: against a real `mlflow server` (the module's
own, conftest.py), and a small HTTP proxy in front of it that answers 403 the way an expired
token is answered. Every assertion reads the values back through MlflowClient or the pending
file; the replay is the command the warning names."""
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration.mlflow.pending import PENDING_FILE, REFUSED
from orchestration.mlflow.tracker import RunTracker
from orchestration.run import refused_changes

ROOT = Path(__file__).resolve().parents[3]
TOO_LONG_KEY = "k" * 251  # MLflow's limit on a metric key is 250 characters
TOO_LONG_TAG_KEY = "eval/" + "t" * 246  # and on a tag key


pytestmark = pytest.mark.usefixtures("restore_http_env")


class Proxy:
    """Forwards every request to `upstream`, or answers 403 (plain text, as a gateway does)
    while `refusing` is set."""

    def __init__(self, upstream: str):
        self.upstream, self.refusing, self.refused = upstream, False, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                if proxy.refusing:
                    proxy.refused += 1
                    body = b"403 Forbidden: token expired"
                    self.send_response(403)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(proxy.upstream + self.path, data=data, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=30) as r:
                        status, body, kind = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, body, kind = e.code, e.read(), e.headers.get("Content-Type", "")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def proxy(server):
    p = Proxy(server)
    yield p
    p.stop()


def _open(uri, run_dir):
    return RunTracker.open(uri, "lzn-refusal-tests", run_dir, run_name=Path(run_dir).name, params={"steps": "20"},
                           config_yaml="steps: 20\n", tags={}, refused_changes=refused_changes,
                           system_metrics=False, flush_every_s=3600)  # delivery only by flush(): no race


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _replay(path, uri):
    return subprocess.run([sys.executable, "-m", "orchestration.mlflow.tracker", "import", str(path), "--uri", uri],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_entries_the_server_refuses_are_isolated_and_kept_while_the_rest_of_their_batch_lands(server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    tracker = _open(server, run_dir)
    for step in range(1, 21):
        tracker.on_log(step, {"loss": 1.0 / step, "lr": 0.1, **({TOO_LONG_KEY: 7.0} if step == 7 else {})})
    tracker.log_metrics({TOO_LONG_TAG_KEY: "a note", "eval/fid": 12.5}, step=20)
    assert tracker.flush(timeout_s=60)  # nothing left in memory: delivered or kept aside
    client = MlflowClient(server)
    run_id = tracker.run_id
    assert _steps(client, run_id, "loss") == list(range(1, 21)) and _steps(client, run_id, "lr") == list(range(1, 21))
    assert client.get_run(run_id).data.metrics["eval/fid"] == 12.5

    pending = run_dir / PENDING_FILE
    kept = [json.loads(line) for line in pending.read_text().splitlines()]
    assert sorted((r.get("key") or r.get("tag"))[:4] for r in kept) == ["eval", "kkkk"]  # only the two bad ones
    metric = next(r for r in kept if "key" in r)
    assert (metric["key"], metric["value"], metric["step"], metric["run_id"]) == (TOO_LONG_KEY, 7.0, 7, run_id)
    assert all(r[REFUSED].startswith("HTTP 400: ") for r in kept)
    err = capsys.readouterr().err
    assert f"kept these in {pending}" in err and f"python -m orchestration.mlflow.tracker import {pending}" in err
    tracker.close()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "refused 2 entries (HTTP 400: " in capsys.readouterr().err  # said again at close

    # Replayed as it is: refused again, kept, exit 1 with the reason; nothing else changes.
    again = _replay(pending, server)
    assert again.returncode == 1 and "the server refused 2 entries (HTTP 400: " in again.stderr, again.stderr
    assert len(pending.read_text().splitlines()) == 2
    # The user fixes the lines (a key and a value MLflow accepts) and replays: delivered, file gone.
    fixed = [{**r, "key": "big"} if "key" in r else {**r, "tag": "eval/note"} for r in kept]
    pending.write_text("".join(json.dumps(r) + "\n" for r in fixed))
    done = _replay(pending, server)
    assert done.returncode == 0 and "delivered 2 metrics/tags" in done.stdout, done.stderr
    assert not pending.exists()
    run = client.get_run(run_id)
    assert _steps(client, run_id, "big") == [7] and run.data.tags["eval/note"] == "a note"


def test_a_403_like_an_expired_token_keeps_every_refused_batch_and_the_named_command_replays_it(proxy, tmp_path,
                                                                                                  capsys):
    run_dir = tmp_path / "run"
    tracker = _open(proxy.uri, run_dir)
    for step in range(1, 6):
        tracker.on_log(step, {"loss": float(step)})
    assert tracker.flush(timeout_s=60)
    proxy.refusing = True  # the token expires mid-run
    for step in range(6, 16):
        tracker.on_log(step, {"loss": float(step)})
        if step % 5 == 0:
            assert tracker.flush(timeout_s=60)  # two batches, each refused whole
    tracker.log_metrics({"eval/fid": 3.0}, step=15)
    tracker.close()  # its status cannot be set either: kept for the replay
    client = MlflowClient(proxy.upstream)
    assert _steps(client, tracker.run_id, "loss") == [1, 2, 3, 4, 5]
    pending = run_dir / PENDING_FILE
    records = [json.loads(line) for line in pending.read_text().splitlines()]
    metrics = [r for r in records if "key" in r]
    assert sorted(r["step"] for r in metrics if r["key"] == "loss") == list(range(6, 16))
    assert all(r[REFUSED].startswith("HTTP 403: ") and "token expired" in r[REFUSED] for r in metrics)
    assert [r["status"] for r in records if "status" in r] == ["FINISHED"]
    # A refusal of the request is not an entry's fault: no bisection, one request a batch (the
    # proxy counts 2 flushes, close's delivery and its status).
    assert proxy.refused <= 6
    err = capsys.readouterr().err
    assert err.count("HTTP 403") >= 1 and f"tracker import {pending} --uri {proxy.uri}" in err
    assert client.get_run(tracker.run_id).info.status == "RUNNING"

    proxy.refusing = False  # a new token
    done = _replay(pending, proxy.uri)
    assert done.returncode == 0 and "delivered 11 metrics/tags" in done.stdout, done.stderr
    assert not pending.exists()
    run = client.get_run(tracker.run_id)
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 16))  # every step once
    assert run.data.metrics["eval/fid"] == 3.0 and run.info.status == "FINISHED"
