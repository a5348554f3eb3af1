"""Delivering metrics and tags to an MLflow run in MLflow's batches, and the pending file
that keeps what could not be delivered (`<run_dir>/mlflow_pending.jsonl`) until
`import_pending` (or the run's next start) delivers it.

One JSON object a line, each naming its run and server, so the files of several attempts
simply append. Resending is harmless: the SQL store ignores a metric identical in key,
value, step and timestamp.

The file also keeps what the server *refused* (HTTP 400/401/403/404: an invalid key or
value, an expired token, a deleted run), never dropped: `deliver` bisects a batch the server
refused for its content (400) until only the offending entries are left, so every good
entry lands, and those entries go to the file marked {"refused": "HTTP <status>: <the
server's words>"}. A refusal of the request itself (401/403/404) is not an entry's fault:
the whole batch goes to the file, marked the same way. Once the cause is fixed (a new
token, a key MLflow accepts), `python -m orchestration.mlflow.tracker import <file>`
replays it; what the server refuses again stays in the file, marked with the new reason.
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


# A request the server understood and refused: retrying cannot help. 400 is an entry's fault
# (a key or value MLflow does not accept); the others refuse the request (token, permission, run).
REFUSED_STATUSES = (400, 401, 403, 404)
REFUSED = "refused"  # the mark of a pending line the server refused: its reason
# Requests one refused batch may spend on finding its bad entries (each about 2 log2(n) for
# one bad entry among n): a batch refused for a reason of all its entries (a run that is no
# longer active) must not cost thousands of requests; past it, the rest is kept as a whole.
BISECT_REQUESTS = 200


def refusal(error: Exception) -> str | None:
    """'HTTP <status>: <the server's words>' when `error` is the server refusing a request,
    None when it is not (unreachable, 5xx, timeout: worth retrying). A refusal by a proxy in
    front of the server (plain-text 403) counts too: mlflow raises MlflowException for it."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return None
    status = error.get_http_status_code()
    return f"HTTP {status}: {str(error.message)[:300]}" if status in REFUSED_STATUSES else None


def is_permanent(error: Exception) -> bool:
    """A request the server understood and refused (bad key, expired token, deleted run)."""
    return refusal(error) is not None


def _isolate(send, items: list, reason: str, budget: list[int]) -> list[tuple[object, str]]:
    """The entries of `items` (refused as a whole for `reason`) that the server refuses on
    their own, with their reasons; the others are delivered. Bisects only a refusal of the
    content (HTTP 400), within `budget[0]` requests."""
    if len(items) == 1 or not reason.startswith("HTTP 400") or budget[0] <= 0:
        return [(item, reason) for item in items]
    refused = []
    for half in (items[:len(items) // 2], items[len(items) // 2:]):
        budget[0] -= 1
        try:
            send(half)
        except Exception as e:
            if (why := refusal(e)) is None:
                raise  # unreachable now: the caller keeps the whole batch and sends it again
            refused += _isolate(send, half, why, budget)
    return refused


def deliver(client, run_id: str, metrics: list, tags: dict) -> tuple[list, list]:
    """log_batch within MLflow's limits, keeping going past refusals; metrics are (key, value,
    step, timestamp_ms) tuples. Returns what the server refused, as ([(metric, reason)],
    [((tag, value), reason)]), every other entry delivered. Raises only when the server cannot
    be reached; resending what was delivered is harmless: the SQL store ignores a metric
    identical in key, value, step and timestamp, which is why buffered metrics keep the
    timestamp of their on_log call."""
    from mlflow.entities import Metric, RunTag

    def send_tags(items):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items], synchronous=True)

    def send_metrics(items):
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, s, t in items], synchronous=True)

    refused: tuple[list, list] = ([], [])
    tag_items = list(tags.items())
    chunks = [(send_tags, tag_items[i:i + MAX_BATCH_TAGS], refused[1]) for i in range(0, len(tag_items), MAX_BATCH_TAGS)]
    chunks += [(send_metrics, metrics[i:i + MAX_BATCH], refused[0]) for i in range(0, len(metrics), MAX_BATCH)]
    for send, chunk, out in chunks:
        try:
            send(chunk)
        except Exception as e:
            if (why := refusal(e)) is None:
                raise
            out += _isolate(send, chunk, why, [BISECT_REQUESTS])
    return refused


def append_pending(path: Path, run_id: str, uri: str, metrics: list, tags: dict,
                    status: str | None = None) -> None:
    """One JSON object a line, each naming its run and server, so files from several attempts
    can simply be appended to each other: a metric {"key", "value", "step", "timestamp"}, a
    tag {"tag", "value"}, or the run's final {"status"}."""
    lines = [json.dumps({"run_id": run_id, "uri": uri, "key": k, "value": v, "step": s, "timestamp": t})
             for k, v, s, t in metrics]
    lines += [json.dumps({"run_id": run_id, "uri": uri, "tag": k, "value": v}) for k, v in tags.items()]
    lines += [json.dumps({"run_id": run_id, "uri": uri, "status": status})] if status else []
    _append_lines(path, lines)


def append_refused(path: Path, run_id: str, uri: str, metrics: list, tags: list) -> None:
    """What `deliver` returned as refused, as pending lines marked {"refused": reason}."""
    lines = [json.dumps({"run_id": run_id, "uri": uri, "key": k, "value": v, "step": s, "timestamp": t,
                         REFUSED: why}) for (k, v, s, t), why in metrics]
    lines += [json.dumps({"run_id": run_id, "uri": uri, "tag": k, "value": v, REFUSED: why}) for (k, v), why in tags]
    _append_lines(path, lines)


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


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


class PendingRefused(UserError):
    """The server refused entries of a pending file again: they stay in it, marked."""


def describe_refused(refused: list[dict]) -> str:
    """'3 entries (HTTP 400: ... x2; HTTP 403: ... x1), e.g. keys a, b'."""
    reasons: dict[str, int] = {}
    for r in refused:
        reasons[r[REFUSED]] = reasons.get(r[REFUSED], 0) + 1
    keys = list(dict.fromkeys(r.get("key") or r.get("tag") or "status" for r in refused))
    return (f"{len(refused)} entr{'y' if len(refused) == 1 else 'ies'} ("
            + "; ".join(f"{why} x{n}" for why, n in reasons.items())
            + f"), e.g. {', '.join(repr(k[:60]) for k in keys[:3])}")


def replay_command(path: Path, uri: str | None = None) -> str:
    return f"python -m orchestration.mlflow.tracker import {path}" + (f" --uri {uri}" if uri else "")


def import_pending(path: str | Path, uri: str | None = None) -> int:
    """Deliver a mlflow_pending.jsonl and remove it; returns the number of metrics and tags
    delivered, and sets the final status that a closing run could not set. Each line goes to
    `uri`, else the server it names, else $MLFLOW_TRACKING_URI. Unreachable: the file keeps
    what was not delivered (resending a delivered metric is harmless) and the error is raised.
    Refused entries (see the module doc) are delivered around: the file keeps only them,
    marked with the server's reason, and `PendingRefused` says so after the rest is delivered."""
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
    delivered, kept = 0, []
    for n, ((target, run_id), group) in enumerate(groups.items()):
        try:
            client = MlflowClient(target)
            metrics = [(r["key"], r["value"], r["step"], r["timestamp"]) for r in group if "key" in r]
            tags = {r["tag"]: r["value"] for r in group if "tag" in r}
            bad_metrics, bad_tags = deliver(client, run_id, metrics, tags)
            refused = [{"run_id": run_id, "uri": target, "key": k, "value": v, "step": s, "timestamp": t, REFUSED: why}
                       for (k, v, s, t), why in bad_metrics]
            refused += [{"run_id": run_id, "uri": target, "tag": k, "value": v, REFUSED: why} for (k, v), why in bad_tags]
            for status in [r["status"] for r in group if "status" in r][-1:]:
                try:
                    client.set_terminated(run_id, status)
                except Exception as e:
                    if (why := refusal(e)) is None:
                        raise
                    refused.append({"run_id": run_id, "uri": target, "status": status, REFUSED: why})
        except Exception:
            rest = kept + [r for g in list(groups.values())[n:] for r in g]
            write_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rest).encode()))
            raise
        kept += refused
        delivered += len(metrics) + len(tags) - len(bad_metrics) - len(bad_tags)
    if kept:
        write_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        raise PendingRefused(f"{path}: delivered {delivered} metrics/tags; the server refused {describe_refused(kept)}. "
                             f"They stay in {path}, marked \"{REFUSED}\". Fix the cause (a valid token in "
                             "MLFLOW_TRACKING_TOKEN, a key or value MLflow accepts: edit the line), then run: "
                             f"{replay_command(path, uri)}")
    path.unlink(missing_ok=True)
    return delivered
