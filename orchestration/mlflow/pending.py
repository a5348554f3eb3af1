"""Delivering metrics and tags to an MLflow run in MLflow's batches, and the pending file
that keeps what could not be delivered (`<run_dir>/mlflow_pending.jsonl`) until
`import_pending` (or the run's next start) delivers it.

One JSON object a line, each naming its run and server, so the files of several attempts
simply append. Resending is harmless: the SQL store ignores a metric identical in key,
value, step and timestamp.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lzn.atomic import write_atomically
from lzn.errors import UserError
from orchestration.folder import MLFLOW_PENDING

PENDING_FILE = MLFLOW_PENDING  # in the run folder
# MLflow's LogBatch limits (mlflow.utils.validation): 1000 entities a request, at most 100 of
# them params or tags.
MAX_BATCH, MAX_BATCH_TAGS = 1000, 100
# Fail fast instead of MLflow's default ~4 minutes of retries per request: the flush thread
# retries on its own period, and close() must not hang on a dead server. setdefault, so a
# user's explicit setting wins.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def fail_fast() -> None:
    for k, v in FAST_FAIL_ENV.items():
        os.environ.setdefault(k, v)


def warn(message: str) -> None:
    print(f"[tracking] {message}", file=sys.stderr, flush=True)


def is_permanent(error: Exception) -> bool:
    """A request the server understood and refused (bad key, deleted run): retrying cannot help."""
    from mlflow.exceptions import RestException

    return isinstance(error, RestException) and error.get_http_status_code() in (400, 403, 404)


def append_pending(path: Path, run_id: str, uri: str, metrics: list, tags: dict,
                    status: str | None = None) -> None:
    """One JSON object a line, each naming its run and server, so files from several attempts
    can simply be appended to each other: a metric {"key", "value", "step", "timestamp"}, a
    tag {"tag", "value"}, or the run's final {"status"}."""
    lines = [json.dumps({"run_id": run_id, "uri": uri, "key": k, "value": v, "step": s, "timestamp": t})
             for k, v, s, t in metrics]
    lines += [json.dumps({"run_id": run_id, "uri": uri, "tag": k, "value": v}) for k, v in tags.items()]
    lines += [json.dumps({"run_id": run_id, "uri": uri, "status": status})] if status else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def send_batches(client, run_id: str, metrics: list, tags: dict) -> None:
    """log_batch within MLflow's limits; metrics are (key, value, step, timestamp_ms) tuples.
    Resending is harmless: the SQL store ignores a metric identical in key, value, step and
    timestamp, which is why buffered metrics keep the timestamp of their on_log call."""
    from mlflow.entities import Metric, RunTag

    tag_items = list(tags.items())
    for i in range(0, len(tag_items), MAX_BATCH_TAGS):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_items[i:i + MAX_BATCH_TAGS]], synchronous=True)
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, s, t in metrics[i:i + MAX_BATCH]],
                         synchronous=True)


def read_pending(path: Path) -> tuple[list[dict], int]:
    """The records of a pending file, and how many lines could not be read (cut short by a
    crash while appending)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            bad += 1
    return records, bad


def import_pending(path: str | Path, uri: str | None = None) -> int:
    """Deliver a mlflow_pending.jsonl and remove it; returns the number of metrics and tags
    delivered, and sets the final status that a closing run could not set. Each line goes to
    `uri`, else the server it names, else $MLFLOW_TRACKING_URI. On failure the file keeps what
    was not delivered (resending a delivered metric is harmless, see `send_batches`)."""
    from mlflow import MlflowClient

    path = Path(path)
    records, bad = read_pending(path)
    if bad:
        warn(f"{path}: skipped {bad} unreadable line(s)")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        target = uri or r.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not target:
            raise UserError(f"{path}: a line names no server and neither --uri nor $MLFLOW_TRACKING_URI is set")
        groups.setdefault((target, r["run_id"]), []).append(r)
    delivered = 0
    for n, ((target, run_id), group) in enumerate(groups.items()):
        try:
            client = MlflowClient(target)
            send_batches(client, run_id, [(r["key"], r["value"], r["step"], r["timestamp"]) for r in group if "key" in r],
                  {r["tag"]: r["value"] for r in group if "tag" in r})
            for status in [r["status"] for r in group if "status" in r][-1:]:
                client.set_terminated(run_id, status)
        except Exception:
            rest = [r for g in list(groups.values())[n:] for r in g]
            write_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rest).encode()))
            raise
        delivered += sum("status" not in r for r in group)
    path.unlink(missing_ok=True)
    return delivered
