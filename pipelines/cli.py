"""What every entry point shares: the error guard and its exit codes, the device, printing
metrics, the run's metadata (where and as what it is tracked) and the git commit.

Exit codes: 0 done; 2 bad input (a `UserError`: a setting, a file or a dataset that cannot
make a run, said in one line); 1 a failed run (any other exception, with its traceback).
HYDRA_FULL_ERROR=1 shows the traceback of bad input too.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar

from omegaconf import DictConfig, OmegaConf

from lzn.errors import UserError
from orchestration.mlflow.runs import check_resumable
from orchestration.mlflow.tracker import resolve_tracking_uri
from orchestration.run import RunConfig, RunMeta, refused_changes, run_params

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
T = TypeVar("T")


def guarded(fn: Callable[[], T]) -> T:
    """fn(); bad input (UserError) exits 2 with one line, no traceback."""
    try:
        return fn()
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the whole story
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


CONF = Path(__file__).resolve().parent / "conf"


def unknown_group_choice(args: list[str]) -> str | None:
    """What is wrong with a `group=name` argument (task=, data=, scale=, hardware=, ...) that
    names no YAML in pipelines/conf/<group>/, with the closest known names; None when every
    one is known. Checked before Hydra composes, so the user reads a suggestion, not a trace."""
    import difflib

    for arg in args:
        key, eq, value = arg.lstrip("+").partition("=")
        folder = CONF / key
        if not eq or "." in key or "/" in key or not value or value == "null" or not folder.is_dir():
            continue
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for choice in value.split(","):  # a multirun's list
            if choice not in known:
                close = difflib.get_close_matches(choice, known, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                return f"{key}={choice!r} is not known; {hint}known: {', '.join(known)} (pipelines/conf/{key}/)"
    return None


def entry(main: Callable[[], T]) -> T:
    """Run a Hydra entry point, after refusing an unknown config group choice (exit 2)."""
    problem = unknown_group_choice(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    return main()


def device(name: str):
    """auto: cuda when available, else cpu."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def print_header(title: str) -> None:
    """The line that opens a command's own last words (its results, where they are, what to
    run next), below all that Ray, Tune and MLflow printed: their stderr is flushed first."""
    sys.stderr.flush()
    print(f"\n=== {title} ===", flush=True)


def print_metrics(metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        value = metrics[key]
        print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def git_commit() -> str:
    """HEAD of this checkout (-dirty with uncommitted changes); a Ray job's uploaded copy has
    no .git, so `pipelines.submit` sends the submitter's commit as $LZN_GIT_COMMIT."""
    if os.environ.get("LZN_GIT_COMMIT"):
        return os.environ["LZN_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def _remote(address: str | None) -> bool:
    """A Ray address on another machine (not auto, local or a 127.0.0.1/localhost one)."""
    if not address or address in ("auto", "local"):
        return False
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host not in ("127.0.0.1", "localhost", socket.gethostname())


def _entry_point() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("pipelines.") else "pipelines.train"


def run_meta(cfg: RunConfig, dcfg: DictConfig, run_dir: Path) -> RunMeta:
    """Where and as what the run is tracked; starts the local MLflow server when needed."""
    t = cfg.tracking
    commit = git_commit()
    if t.enabled and cfg.backend == "ray" and _remote(os.environ.get("RAY_ADDRESS")) \
            and not (t.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UserError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is a cluster whose workers cannot reach a "
                        "tracking server on this machine's 127.0.0.1: set MLFLOW_TRACKING_URI (or tracking.uri=) "
                        "to a server they can reach (infra/mlflow/), or tracking.enabled=false")
    uri = resolve_tracking_uri(t, cfg.output_dir) if t.enabled else None
    if uri:
        check_resumable(uri, run_dir, run_params(cfg), refused_changes)
    return RunMeta(
        tracking_uri=uri,
        tracking=t,
        experiment=t.experiment or cfg.name,
        run_name=f"{cfg.run_name}",
        config_yaml=OmegaConf.to_yaml(dcfg, resolve=True),
        tags={"mlflow.source.git.commit": commit, "lzn.git_commit": commit,
              "lzn.command": shlex.join([sys.executable, "-m", _entry_point(), *sys.argv[1:]]),
              "lzn.task": cfg.name, "lzn.scale": cfg.scale, "lzn.backend": cfg.backend,
              "lzn.run_dir": str(run_dir.resolve())})
