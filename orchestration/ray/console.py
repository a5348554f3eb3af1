"""What a Ray run shows on the driver's console: rank 0's progress bar drawn once, by the
driver, and Ray's known-harmless messages turned off with Ray's own switches.

A Ray worker's stdout and stderr reach the driver as lines: a worker's own tqdm arrives as
a new line per refresh. `DriverDrawnBar` sends the bar's state through
`ray.experimental.tqdm_ray` instead, and the driver draws one bar that moves in place.
That needs each print of a worker to reach the driver once, which Ray Train's print patch
breaks (see `quiet_local_ray`): where the patch is on (a cluster's own settings), rank 0
keeps tqdm's own bar. A sweep's trials draw none (`fit_on_ray(progress=False)`): Tune's
trial table is the sweep's progress display.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

# Ray Train (2.x, Train V2) patches print in its workers to log each print to its own files;
# Ray having wrapped the worker's stdout, the patch also prints the line itself, so the driver
# shows every print twice, and tqdm_ray's bar states reach it out of order over two streams.
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def quiet_local_ray() -> None:
    """Before `ray.init` starts a local Ray, whose processes inherit this environment: no
    notice that a new local cluster uses token authentication (it still does), no error from
    Ray Train's PreemptionWatcher actor at every run start (it watches for drained nodes,
    which the one node started here never is), and no print patch in Ray Train's workers.
    Values already in the environment are kept."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault(PRINT_PATCH, "0")


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train logs every rank's `ray.train.report` at INFO under a
    logger named by its file's path, which RunConfig's LoggingConfig(log_level="WARNING") does
    not reach (it filters the `ray.train` loggers); that logger alone goes to WARNING."""
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_progress(progress: bool) -> bool | Callable:
    """Rank 0's bars in a Ray Train worker, as `orchestration.run.train_and_evaluate` takes
    them: drawn by the driver where each print of a worker reaches it once, else tqdm's own
    (its refreshes reach the driver as lines); none when progress is False."""
    if not progress:
        return False
    return DriverDrawnBar if os.environ.get(PRINT_PATCH) == "0" else True


class DriverDrawnBar:
    """The part of tqdm that the trainer and the evaluation use (total, initial, update,
    set_postfix, close, iteration), drawn by the Ray driver through tqdm_ray, which has no
    postfix: it goes into the description, which tqdm_ray sends with the count."""

    def __init__(self, iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", disable: bool = False, **_terminal_only):
        from ray.experimental import tqdm_ray

        self.iterable, self.desc, self.bar = iterable, desc, None
        if disable:
            return
        if total is None and iterable is not None:
            total = len(iterable)
        self.bar = tqdm_ray.tqdm(desc=desc, total=total, unit=unit)
        if initial:
            self.bar.update(initial)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_description(" ".join([self.desc, *(f"{k}={v}" for k, v in values.items())]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
