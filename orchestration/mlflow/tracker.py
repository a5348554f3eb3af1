"""MLflow tracking for LZN training runs: the `tracking:` config, the tracking URI, and the
rank-0 logger. Beside it: `server` (the local server), `pending` (batched delivery and the
pending file), `runs` (which run a run folder continues).

Every writer talks to an MLflow *server* over HTTP, never to the file store (`./mlruns`):
either the one $MLFLOW_TRACKING_URI / `tracking.uri` names, or a local one this module
starts under `<output_dir>/mlflow` (SQLite backend, artifacts proxied by the server, so a
worker on another node uploads over HTTP and needs no shared disk).

`RunTracker` is what the trainer's callback slot receives on rank 0. Its rule is that
training never blocks or crashes because of tracking: `on_log` only appends to a buffer,
a background thread delivers it, an unreachable server means buffering (and, at `close`,
a `mlflow_pending.jsonl` beside the run that `import` delivers later). Resuming reopens
the same MLflow run through `<run_dir>/mlflow_run.json`. Its system metrics are those of
rank 0's node; a run of several processes gives each of its nodes a `NodeMetricsMonitor`
(`orchestration.mlflow.node_metrics`) instead, which logs that node as system/<node>/... in
the same run.

mlflow is imported inside functions: pipelines import `TrackingConfig` to register the
`tracking:` section, and that must not cost the seconds an `import mlflow` takes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Mapping, Optional

from lzn.atomic import write_atomically
from lzn.errors import UserError
from orchestration.mlflow.pending import (
    MAX_BATCH, MAX_BATCH_TAGS, REFUSED, PendingRefused, append_pending, append_refused, deliver, describe_refused,
    fail_fast, import_pending, read_pending, replay_command, warn,
)
from orchestration.folder import CONFIG_FILE, RunFolder
from orchestration.mlflow.runs import RefusedChanges, find_or_create_experiment, param_value, stored_run
from orchestration.mlflow.server import local_server, running_server, stop_local_server

# Metrics kept in memory during an outage before the flush thread spills them to the pending
# file (about 100 bytes each): a long outage must not grow the worker's memory without bound.
MAX_BUFFERED = 100_000

@dataclass
class TrackingConfig:
    """The `tracking:` section of a task config."""
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI if set, else a local server under <output_dir>/mlflow
    experiment: Optional[str] = None  # None: the task name
    flush_every_s: float = 5.0  # background delivery period of buffered metrics
    system_metrics: bool = True
    system_metrics_every_s: float = 10.0  # CPU, memory, disk, network (and GPU) sampling period
    register_model: bool = True
    model_alias: str = "candidate"
    open_timeout_s: float = 300.0  # how long a run waits for an unreachable server at start, then trains untracked


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: str | Path) -> str:
    """`cfg.uri`, else $MLFLOW_TRACKING_URI, else a local server under <output_dir>/mlflow."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if not uri.startswith(("http://", "https://")):
            raise UserError(f"tracking URI {uri!r} is not an MLflow server: expected http(s)://host:port "
                            "(the file store and direct database URIs are not supported; workers log over HTTP)")
        return uri.rstrip("/")
    state_dir = (Path(output_dir) / "mlflow").resolve()
    if info := running_server(state_dir):
        return info["uri"]
    uri = local_server(state_dir)
    print(f"Started an MLflow server at {uri} (state in {state_dir}); it keeps running for later "
          f"commands. Stop it with: python -m orchestration.mlflow.tracker stop --dir {state_dir}", flush=True)
    return uri


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": {"encoder": 1e-3}}} -> {"optim.lr.encoder": "0.001"}; lists as str."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = str(value)
    return out


# --------------------------------------------------------------------------- the run tracker


def _number(value) -> float | None:
    """`value` as a float (ints, numpy and 0-d torch scalars included), None if it is not a number."""
    if isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def end_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with after `error` (None: it returned): KILLED for a stop
    asked from outside (Ctrl-C, or SystemExit(0), which is how Ray Train's session ends a
    trial that Tune's scheduler stops, in `ray.train.report`), FAILED for anything else."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code in (0, None)):
        return "KILLED"
    return "FAILED"


class RunTracker:
    """One MLflow run for one training run folder, written from rank 0 only."""

    def __init__(self, client, uri: str, run_id: str, run_dir: Path, last_logged_step: int, resumed: bool,
                 system_metrics: bool, flush_every_s: float, system_metrics_every_s: float = 10.0):
        self._client, self.uri, self.run_id, self.run_dir = client, uri, run_id, run_dir
        self._pending = RunFolder(run_dir).mlflow_pending  # what the server has not taken yet
        self.last_logged_step = last_logged_step
        self.seconds_logging = 0.0
        self._flush_every_s = flush_every_s
        self._metrics: list[tuple[str, float, int, int]] = []  # (key, value, step, timestamp_ms)
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()  # guards the buffer; held for microseconds
        self._delivering = threading.Lock()  # one delivery at a time (thread, flush, close)
        self._stop = threading.Event()
        self._down_since_delivered: int | None = None  # metrics delivered since an outage began
        self._max_step = last_logged_step
        self._refusals_said: set[str] = set()  # the reasons of refusals already warned about
        self._closed = False
        self._system_metrics = system_metrics
        self._system_metrics_every_s = system_metrics_every_s
        self._monitor = None
        if system_metrics:
            self._start_monitor(resume=resumed)
        self._thread = threading.Thread(target=self._flush_loop, name="mlflow-flush", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, uri: str, experiment: str, run_dir: str | Path, *, run_name: str, params: dict[str, str],
             config_yaml: str, tags: dict[str, str], refused_changes: RefusedChanges, system_metrics: bool = True,
             flush_every_s: float = 5.0, system_metrics_every_s: float = 10.0) -> "RunTracker":
        """Continue the run recorded in <run_dir>/mlflow_run.json, or create one in `experiment`."""
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        fail_fast()
        uri, run_dir = uri.rstrip("/"), Path(run_dir)
        client = MlflowClient(uri)
        folder = RunFolder(run_dir)
        run_file, pending = folder.mlflow_run, folder.mlflow_pending
        params = {k: param_value(str(v)) for k, v in params.items()}
        resumed, changes = run_file.exists(), {}
        if resumed:
            run, changes = stored_run(client, run_file, uri, params, refused_changes)
            run_id = run.info.run_id
        if pending.exists():  # before RUNNING: the file may end with the previous attempt's status
            try:
                n = import_pending(pending, uri)
                warn(f"delivered {n} metrics/tags that a previous attempt kept in {pending}")
            except PendingRefused as e:  # kept aside, marked: never a reason not to train
                warn(str(e))
        if resumed:
            client.update_run(run_id, status="RUNNING")
            run = client.get_run(run_id)
        else:
            experiment_id = find_or_create_experiment(client, experiment, uri)
            run = client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        record = {"run_id": run_id, "experiment_id": experiment_id, "uri": uri}
        write_atomically(run_file, lambda f: f.write(json.dumps(record, indent=1).encode()))
        new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
        resumed_with = {f"lzn.resumed.{k}": v for k, v in changes.items()}
        all_tags = [RunTag(k, str(v)) for k, v in {**tags, **resumed_with, "mlflow.runName": run_name}.items()]
        for i in range(0, max(len(new), len(all_tags)), MAX_BATCH_TAGS):
            client.log_batch(run_id, params=new[i:i + MAX_BATCH_TAGS], tags=all_tags[i:i + MAX_BATCH_TAGS],
                             synchronous=True)
        client.log_text(run_id, config_yaml, CONFIG_FILE)
        # The latest value of each metric is the one at its largest step, so the run's summary
        # gives the max logged step without reading whole histories. system/ steps count samples.
        steps = [m.step for m in run.data.to_proto().metrics if not m.key.startswith("system/")]
        return cls(client, uri, run_id, run_dir, max(steps, default=0), resumed, system_metrics, flush_every_s,
                   system_metrics_every_s)

    # -- trainer callback ------------------------------------------------------------------

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer training metrics; steps a resumed run already logged are dropped."""
        t0 = time.perf_counter()
        if step > self.last_logged_step:
            ts = int(time.time() * 1000)
            rows = [(k, float(v), step, ts) for k, v in metrics.items()]
            with self._lock:
                self._metrics.extend(rows)
                self._max_step = max(self._max_step, step)
        self.seconds_logging += time.perf_counter() - t0

    def before_checkpoint(self, step: int) -> None:
        """Make every buffered metric durable before the trainer writes a checkpoint: a crash
        after it resumes from that checkpoint and never recomputes the steps before it, so
        they must be in MLflow (or, with the server down, in the pending file) by then."""
        if not self.flush(timeout_s=10):
            # A copy, under the buffer lock only: never wait on a delivery stuck on a dead
            # server. Sending a metric twice is harmless (same key, step, value, timestamp).
            with self._lock:
                metrics, tags = list(self._metrics), dict(self._tags)
            append_pending(self._pending, self.run_id, self.uri, metrics, tags)

    def on_checkpoint(self, step: int, path) -> None:
        with self._lock:
            self._tags["lzn.last_checkpoint"] = str(path)
            self._tags["lzn.last_checkpoint_step"] = str(step)

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        """Evaluation metrics, buffered like training metrics; str values (and anything else
        that is not a number) become tags, so an odd value in a report never stops a run."""
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if (value := _number(v)) is None:
                    self._tags[k] = str(v)
                else:
                    self._metrics.append((k, value, step, ts))
        self.seconds_logging += time.perf_counter() - t0

    # -- artifacts and models: synchronous, and a failure is a warning -----------------------

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            warn(f"could not upload {path} to run {self.run_id} on {self.uri}: {e}")

    def log_dataset(self, dataset_dir) -> None:
        """The run's prepared dataset as an MLflow input (name, the manifest's checksum as its
        digest, source, rows per split: orchestration.mlflow.dataset); a failure is a warning."""
        from orchestration.mlflow.dataset import dataset_input

        try:
            self._client.log_inputs(self.run_id, datasets=[dataset_input(dataset_dir)])
        except Exception as e:
            warn(f"could not log the dataset {dataset_dir} of run {self.run_id} on {self.uri}: {e}")

    def register_model(self, objective, cfg, name: str, alias: str) -> str | None:
        """Log `objective` (the EMA model; `cfg`: its task) as this run's model without pickle
        (orchestration.mlflow.model), register it under `name`, point `alias` at the new
        version and return the version; None (and a warning) if the server refused or is down."""
        from orchestration.mlflow.model import log_lzn_model

        self.flush(timeout_s=30)
        try:
            version = log_lzn_model(self.uri, self.run_id, objective, cfg, name, step=self._max_step)
            self._client.set_registered_model_alias(name, alias, version)
            return version
        except Exception as e:
            warn(f"could not register the model of run {self.run_id} as {name!r} on {self.uri}: {e}")
            return None

    # -- delivery ----------------------------------------------------------------------------

    def _deliver_once(self) -> bool | None:
        """Send one batch from the head of the buffer. True: sent, None: nothing to send,
        False: the server is unreachable (the batch stays buffered)."""
        with self._lock:
            tags = dict(list(self._tags.items())[:MAX_BATCH_TAGS])
            n = min(len(self._metrics), MAX_BATCH - len(tags))
            if n < len(self._metrics):  # end the batch at a step boundary: a crash between two
                cut = n                  # batches must not leave a step half delivered
                while cut > 0 and self._metrics[cut - 1][2] == self._metrics[cut][2]:
                    cut -= 1
                n = cut or n
            metrics = self._metrics[:n]
        if not metrics and not tags:
            return None
        try:
            refused = deliver(self._client, self.run_id, metrics, tags)
        except Exception as e:  # deliver raises only when the server cannot be reached
            if self._down_since_delivered is None:
                self._down_since_delivered = 0
                warn(f"MLflow server {self.uri} unreachable: buffering {len(self._metrics)} metrics, "
                      f"retrying every {self._flush_every_s:g}s ({type(e).__name__}: {str(e)[:200]})")
            return False
        if refused[0] or refused[1]:
            self._keep_refused(refused, len(metrics) + len(tags))
        with self._lock:
            del self._metrics[:n]
            for k, v in tags.items():
                if self._tags.get(k) == v:
                    del self._tags[k]
            empty = not self._metrics and not self._tags
        if self._down_since_delivered is not None:
            self._down_since_delivered += n
            if empty:
                warn(f"MLflow server {self.uri} reachable again: delivered {self._down_since_delivered} "
                      "buffered metrics")
                self._down_since_delivered = None
                self._recovered()
        return True

    def _keep_refused(self, refused: tuple[list, list], sent: int) -> None:
        """What the server refused of one batch goes to the pending file, marked with its reason
        (never dropped); said once per reason, since an expired token refuses every batch."""
        append_refused(self._pending, self.run_id, self.uri, *refused)
        reasons = {why for _, why in refused[0] + refused[1]}
        new = reasons - self._refusals_said
        self._refusals_said |= reasons
        if new:
            n = len(refused[0]) + len(refused[1])
            warn(f"MLflow server {self.uri} refused {n} of {sent} metrics/tags of run {self.run_id} "
                  f"({'; '.join(sorted(new))}); delivered the rest and kept these in {self._pending}, marked "
                  f"\"{REFUSED}\". Fix the cause (a valid token in MLFLOW_TRACKING_TOKEN, a key or value MLflow "
                  f"accepts), then run: {replay_command(self._pending, self.uri)}")

    def _recovered(self) -> None:
        pending = self._pending
        if pending.exists():  # spilled during the outage
            try:
                warn(f"delivered {import_pending(pending, self.uri)} metrics/tags spilled to {pending}")
            except PendingRefused as e:
                warn(str(e))
            except Exception:  # down again: the flush thread notices
                pass
        if self._system_metrics and not self._stop.is_set():  # mlflow's monitor thread exits for good
            self._start_monitor(resume=True)                    # on its first failed request

    def _start_monitor(self, resume: bool) -> None:
        try:
            # mlflow's CPU monitor needs psutil, which mlflow does not install.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            if self._monitor is not None:
                self._monitor.finish()
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri,
                                                 sampling_interval=self._system_metrics_every_s)
            self._monitor.start()
        except ImportError as e:
            warn(f"system metrics off: {e} (pip install psutil, and nvidia-ml-py for GPUs)")
            self._monitor, self._system_metrics = None, False
        except Exception as e:
            warn(f"system metrics off for run {self.run_id}: {e}")
            self._monitor, self._system_metrics = None, False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Deliver the buffer now; True if it is empty afterwards."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._delivering.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        try:
            while self._deliver_once() and (deadline is None or time.monotonic() < deadline):
                pass
        finally:
            self._delivering.release()
        with self._lock:
            return not self._metrics and not self._tags

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_every_s):
            try:
                self.flush()
                if (n := len(self._metrics)) > MAX_BUFFERED:
                    self._spill()
                    warn(f"moved {n} buffered metrics to {self._pending} to bound memory; "
                          "they are delivered once the server answers")
            except Exception as e:  # this thread must outlive any surprise
                warn(f"tracking flush error: {e}")

    def _spill(self) -> None:
        """Move the whole buffer to the pending file. Holds the delivery lock, so no delivery
        in flight removes rows by position from the emptied buffer afterwards."""
        with self._delivering, self._lock:
            metrics, tags = self._metrics, self._tags
            self._metrics, self._tags = [], {}
        append_pending(self._pending, self.run_id, self.uri, metrics, tags)

    def close(self, status: str = "FINISHED") -> None:
        """Stop the flush thread, deliver what is buffered (three tries), keep the rest in
        <run_dir>/mlflow_pending.jsonl, and set the run's status."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=2 * float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 30)))
        if self._monitor is not None:
            self._monitor.finish()
        delivered = False
        for _ in range(3):
            if delivered := self.flush(timeout_s=30):
                break
            time.sleep(1.0)
        if not delivered:
            self._spill()
        pending = self._pending
        if delivered and pending.exists():  # spilled earlier in an outage that has ended
            with contextlib.suppress(Exception):  # refused entries stay, said below
                import_pending(pending, self.uri)
        if pending.exists():
            records = read_pending(pending)[0]
            refused = [r for r in records if REFUSED in r]
            kept = [r for r in records if REFUSED not in r and "status" not in r]
            n_tags = sum("tag" in r for r in kept)
            if kept:
                warn(f"MLflow server {self.uri} unreachable at close: kept {len(kept) - n_tags} metrics and {n_tags} "
                      f"tags of run {self.run_id} in {pending}. Reopening this run folder delivers them, or run: "
                      f"{replay_command(pending, self.uri)}")
            if refused:
                warn(f"MLflow server {self.uri} refused {describe_refused(refused)} of run {self.run_id}: kept in "
                      f"{pending}, marked \"{REFUSED}\". Fix the cause, then run: {replay_command(pending, self.uri)}")
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            append_pending(pending, self.run_id, self.uri, [], {}, status=status)
            warn(f"could not set run {self.run_id} to {status} on {self.uri} ({type(e).__name__}); "
                  f"{pending} keeps the status for import")

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        self.close(end_status(exc))


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.mlflow.tracker", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("server", help="start (or reuse) a local MLflow server and print its URI")
    p.add_argument("--dir", required=True, help="state folder (SQLite database, artifacts, server.json)")
    p.add_argument("--port", type=int, default=None)
    p = sub.add_parser("stop", help="stop the local MLflow server of a state folder")
    p.add_argument("--dir", required=True)
    p = sub.add_parser("import", help="deliver a mlflow_pending.jsonl")
    p.add_argument("file")
    p.add_argument("--uri", default=None, help="server to deliver to (default: the one each line names)")
    args = parser.parse_args(argv)
    if args.command == "server":
        print(local_server(args.dir, port=args.port))
    elif args.command == "stop":
        print("stopped" if stop_local_server(args.dir) else f"no MLflow server was running for {args.dir}")
    else:
        fail_fast()
        try:
            print(f"delivered {import_pending(args.file, args.uri)} metrics/tags from {args.file}")
        except PendingRefused as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
