"""One system-metrics monitor per node of a training run (`NodeMetricsMonitor`): each
node's CPU, memory, disk, network and (nvidia-ml-py) GPUs as system/<node>/... in the run
rank 0's `RunTracker` opens. A run of several processes (Ray Train, torchrun, a Slurm DDP
job) starts one on every node's local rank 0 (`orchestration.run.node_metrics`)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from orchestration.folder import RunFolder
from orchestration.mlflow.pending import warn


class NodeMetricsMonitor:
    """One node's system metrics (CPU, memory, disk, network; the GPUs through NVML when
    nvidia-ml-py finds a driver) in the training run's MLflow run, as
    `system/<node_id>/<metric>`: every node of a multi-node run starts one, on its local rank 0,
    so each node's machines appear in the same run.

    The run is the one rank 0's `RunTracker` records in <run_dir>/mlflow_run.json (the run
    folder is on storage every node mounts): a thread polls that file every `poll_s`, starts
    MLflow's monitor once the run it names is RUNNING, and starts it again (continuing its
    sample count) whenever it stopped while the run still runs: MLflow's monitor thread exits
    for good on its first failed request, or when it sees the run not RUNNING (a resumed
    run's old status, before rank 0 reopens it). Never raises into training: a failure is a
    warning and the node goes unmonitored."""

    def __init__(self, run_dir: str | Path, uri: str, node_id: str, *, every_s: float = 10.0,
                 poll_s: float | None = None):
        self.folder, self.uri, self.node_id = RunFolder(run_dir), uri.rstrip("/"), node_id
        self.every_s = every_s
        self.poll_s = min(every_s, 2.0) if poll_s is None else poll_s
        self.run_id: str | None = None  # the run the current monitor logs to
        self._monitor = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"system-metrics-{node_id}", daemon=True)

    def start(self) -> "NodeMetricsMonitor":
        self._thread.start()
        return self

    def _running(self) -> bool:
        thread = getattr(self._monitor, "_process", None)  # mlflow's sampling thread (None once finished)
        return thread is not None and thread.is_alive()

    def _watch(self) -> None:
        from mlflow import MlflowClient

        client, warned = MlflowClient(self.uri), False
        while not self._stop.is_set():
            try:
                run_id = self.folder.mlflow_run_id()
                if run_id is not None and (run_id != self.run_id or not self._running()) \
                        and client.get_run(run_id).info.status == "RUNNING" and not self._stop.is_set():
                    self._restart(run_id)
            except ImportError as e:
                warn(f"system metrics of node {self.node_id} off: {e} (pip install psutil, and nvidia-ml-py for GPUs)")
                return
            except Exception as e:  # a run file being replaced, a server down: look again later
                if self._stop.is_set():
                    return
                if not warned:
                    warn(f"system metrics of node {self.node_id} wait: {type(e).__name__}: {str(e)[:200]}; "
                         f"retrying every {self.poll_s:g} s")
                    warned = True
            self._stop.wait(self.poll_s)

    def _restart(self, run_id: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self._monitor is not None:
            self._monitor.finish()
        # resume_logging: continue after the run's largest system/ step (any node's), so a
        # restarted monitor never logs a step twice.
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=self.every_s, resume_logging=True,
                                             node_id=self.node_id, tracking_uri=self.uri)
        self._monitor.start()
        self.run_id = run_id

    def stop(self) -> None:
        """Stop watching and let MLflow's monitor deliver what it sampled."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 30)))
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def __enter__(self) -> "NodeMetricsMonitor":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
