"""What a Ray Train run does when a node goes (all its processes killed, a machine lost).

Ray Train sees the node's workers die, and its controller restarts the worker group from the
last checkpoint (`trainer.max_failures` times). Where it restarts depends on the run's size:
- elastic (`trainer.min_workers` < `trainer.num_workers`: Ray Train's
  `ScalingConfig(num_workers=(min, max))`): on the workers that fit on the nodes that remain,
  and back to `num_workers` when the node returns. This fits our fixed global batch: a step's
  rows, noise and augmentation are functions of (seed, step), whatever the worker count
  (`lzn.data`), so the losses of a run resumed on fewer workers are those of one process.
  `validate_trainer` requires every count in [min_workers, num_workers] to divide the batch.
- fixed (`trainer.min_workers` null): Ray waits for the lost workers' resources, each try
  `WORKER_GROUP_START_TIMEOUT_S` long, retried as many times as fit in `trainer.node_wait_s`,
  then the run fails with a message that says so.

`NodeWatch` follows the cluster's nodes from the driver during `trainer.fit()` and says which
node went, what the run does about it, and when it is back: Ray's own log says only that
workers died.
"""
from __future__ import annotations

import math
import os
import sys
import threading

from orchestration.run import RayTrainerConfig

# Ray Train's own switch (ray.train.v2._internal.constants): how long one start of the worker
# group may wait for its resources; propagated from the driver to the controller.
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_START_TIMEOUT_S = 60.0  # Ray Train's default


def elastic(trainer: RayTrainerConfig) -> bool:
    return trainer.min_workers is not None and trainer.min_workers < trainer.num_workers


def scaling_workers(trainer: RayTrainerConfig) -> int | tuple[int, int]:
    """ScalingConfig's num_workers: (min, max) for an elastic run, else the fixed count."""
    return (trainer.min_workers, trainer.num_workers) if elastic(trainer) else trainer.num_workers


def start_timeout_s() -> float:
    """One start's wait for the worker group's resources: the user's setting, else Ray's default."""
    value = os.environ.get(START_TIMEOUT_VAR)
    return float(value) if value else RAY_START_TIMEOUT_S


def start_tries(trainer: RayTrainerConfig) -> int:
    """FailureConfig's controller_failure_limit: the worker group's failed starts (no resources
    within a start timeout, as while a lost node is away) that fit in trainer.node_wait_s."""
    return max(1, math.ceil(trainer.node_wait_s / start_timeout_s()))


def _say(message: str) -> None:
    print(f"[ray] {message}", file=sys.stderr, flush=True)


class NodeWatch:
    """A driver thread that polls `ray.nodes()` every `every_s` seconds while the run trains and
    reports each node that dies or comes back; `lost()` lists those still away (their address)."""

    def __init__(self, trainer: RayTrainerConfig, every_s: float = 2.0):
        self.trainer, self.every_s = trainer, every_s
        self._stop = threading.Event()
        self._alive: dict[str, str] = {}  # node id -> address
        self._lost: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name="lzn-node-watch", daemon=True)

    def __enter__(self) -> "NodeWatch":
        self._alive = self._nodes()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def lost(self) -> list[str]:
        return sorted(self._lost.values())

    @staticmethod
    def _nodes() -> dict[str, str]:
        import ray

        return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.update(self._nodes())
            except Exception as e:  # the watch only informs: it never ends a run
                _say(f"could not read the cluster's nodes ({type(e).__name__}: {e})")

    def update(self, alive: dict[str, str]) -> None:
        """Compare the nodes alive now (id -> address) with the last poll and say what changed."""
        t = self.trainer
        for node, address in self._alive.items():
            if node in alive:
                continue
            self._lost[node] = address
            if elastic(t):
                _say(f"node {address} ({node[:12]}) is gone: Ray Train restarts the run from its last checkpoint "
                     f"on the workers that fit on the nodes that remain (at least trainer.min_workers={t.min_workers}"
                     f", at most {t.num_workers}; the losses do not depend on the count), and back on "
                     f"{t.num_workers} when the node returns")
            else:
                _say(f"node {address} ({node[:12]}) is gone: the run restarts from its last checkpoint once "
                     f"trainer.num_workers={t.num_workers} workers fit again, waiting up to "
                     f"trainer.node_wait_s={t.node_wait_s:g} s for the node (or another) to join; then it fails. "
                     f"trainer.min_workers=<n> lets a run go on with fewer workers")
        for node, address in alive.items():
            if node in self._alive:
                continue
            back = [n for n, a in self._lost.items() if a == address]
            for n in back:
                del self._lost[n]
            _say(f"node {address} ({node[:12]}) {'is back' if back else 'joined'}")
        self._alive = dict(alive)

    def failure(self, error: BaseException) -> RuntimeError | None:
        """The error to raise instead of Ray's when the run failed with a node still away."""
        if not self._lost:
            return None
        t = self.trainer
        return RuntimeError(
            f"the Ray Train run failed while node(s) {', '.join(self.lost())} were gone: "
            + (f"the nodes that remain did not hold trainer.num_workers={t.num_workers} workers within "
               f"trainer.node_wait_s={t.node_wait_s:g} s" if not elastic(t) else
               f"fewer than trainer.min_workers={t.min_workers} workers fit, or the restarts ran out "
               f"(trainer.max_failures={t.max_failures})")
            + f"; bring the node back and run the same command again: it resumes from the last checkpoint "
              f"({type(error).__name__}: {str(error)[:300]})")
