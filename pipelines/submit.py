"""`python -m pipelines.submit task=<name> [mode=train|run|sweep] [wait=false | --no-wait]
[address=<RAY_ADDRESS>] [python=<interpreter>] [key=value ...]` (and `make submit TASK=...`):
the pipeline command as a Ray job on $RAY_ADDRESS.

mode picks the command the job runs: `pipelines.train` (default), `pipelines.run` (the
stage DAG) or `pipelines.sweep`; every other key=value is a Hydra override passed to it
unchanged, after one check here: the overrides are composed against the same typed
configs, so a typo fails in seconds on this machine instead of after the upload. The job
trains with `backend=ray` unless told otherwise. Its run folder: on a cluster on this
machine, the project's outputs/ (where a local run puts it); on a remote cluster,
$LZN_OUTPUT_DIR as the cluster's nodes define it (shared storage, infra/ray/cluster.yaml).
`output_dir=` overrides both.

The command prints the submission id, follows the job's logs until it ends and exits 0 if
it SUCCEEDED, 1 if it FAILED or was STOPPED (with Ray's status message), 2 if it could not
be submitted. `wait=false` returns after submission. How the project, the environment and
the token reach the cluster: orchestration/ray/jobs.py.
"""
from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.ray import jobs as ray_jobs

# mode -> (the module the job runs, its Hydra config name)
MODES = {"train": ("pipelines.train", "config"), "run": ("pipelines.run", "run"), "sweep": ("pipelines.sweep", "sweep")}
CONF_DIR = Path(__file__).resolve().parent / "conf"
REMOTE_OUTPUT_DIR = "${oc.env:LZN_OUTPUT_DIR,outputs}"  # resolved on the cluster, by the job
USAGE = ("usage: python -m pipelines.submit task=<name> [mode=train|run|sweep] [wait=false|--no-wait] "
         "[address=<ray address>] [python=<interpreter>] [hydra overrides ...]")


@dataclass
class Submission:
    mode: str = "train"
    wait: bool = True
    address: str | None = None
    python: str | None = None
    overrides: list[str] = field(default_factory=list)


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ray_jobs.SubmitError(f"{key}={value!r}: expected true or false")


def parse(argv: list[str]) -> Submission:
    """This command's own keys (mode, wait, address, python); the rest are the pipeline's overrides."""
    sub = Submission()
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--no-wait":
            sub.wait = False
        elif arg in ("-h", "--help"):
            print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1])
            raise SystemExit(0)
        elif key == "mode":
            if value not in MODES:
                raise ray_jobs.SubmitError(f"mode={value!r} is not known; expected one of {list(MODES)}")
            sub.mode = value
        elif key == "wait":
            sub.wait = _bool(key, value)
        elif key == "address":
            sub.address = value
        elif key == "python":
            sub.python = value
        elif arg.startswith("-"):
            raise ray_jobs.SubmitError(f"unknown option {arg!r}\n{USAGE}")
        else:
            sub.overrides.append(arg)
    return sub


def _given(overrides: list[str], key: str) -> str | None:
    """The value an override sets `key` to (last one wins, as in Hydra), else None."""
    found = None
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            found = v
    return found


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def compose(mode: str, overrides: list[str]):
    """The typed config the job will load: a wrong key or value fails here, before the upload."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from pipelines.config import to_run_config  # registers every command's schema in Hydra's ConfigStore

    module, config_name = MODES[mode]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return to_run_config(hydra_compose(config_name=config_name, overrides=overrides))
    except Exception as e:
        raise ray_jobs.SubmitError(f"the overrides {overrides} do not make a valid `{module}` config: "
                                   f"{str(e).strip()[:600]}") from None


def pipeline_args(sub: Submission, *, local: bool) -> list[str]:
    """The overrides the job's command gets: the user's, plus backend=ray and the run folder."""
    args = list(sub.overrides)
    if sub.mode != "sweep" and _given(args, "backend") is None:
        args.append("backend=ray")
    if _given(args, "output_dir") is None:
        args.append(f"output_dir={ray_jobs.PROJECT_ROOT / 'outputs'}" if local else f"output_dir={REMOTE_OUTPUT_DIR}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        sub = parse(argv)
        client, url = ray_jobs.connect(sub.address)
        local = ray_jobs.cluster_is_local(url)
        args = pipeline_args(sub, local=local)
        cfg = compose(sub.mode, args)
        environ = dict(os.environ)
        if not cfg.tracking.enabled:  # an untracked run needs no reachable server
            environ.pop("MLFLOW_TRACKING_URI", None)
        elif cfg.tracking.uri:  # the job logs there: this shell's variable neither travels nor is checked
            ray_jobs.check_tracking_uri(cfg.tracking.uri, local=local, what="tracking.uri")
            environ.pop("MLFLOW_TRACKING_URI", None)
        from pipelines.cli import git_commit

        commit = git_commit()  # the job's copy of the project has no .git
        env = ray_jobs.runtime_env(local=local, env=environ, extra_env={"LZN_GIT_COMMIT": commit})
        module = MODES[sub.mode][0]
        command = ray_jobs.entrypoint(module, args, python=sub.python or ray_jobs.default_python(local))
        job_id = ray_jobs.submit(
            client, command, env, submission_id=ray_jobs.submission_id(cfg.name, sub.mode),
            metadata={"lzn.task": cfg.name, "lzn.mode": sub.mode, "lzn.git_commit": commit,
                      "lzn.submitted_by": _user()})
    except ray_jobs.SubmitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"submitted to {url}: {command}")
    print(f"submission id: {job_id}", flush=True)
    if not sub.wait:
        print(f"follow: ray job logs --follow {job_id} --address {url}\nstop:   ray job stop {job_id} --address {url}")
        return 0
    try:
        status, message, driver = ray_jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (stop it: ray job stop {job_id} --address {url})",
              file=sys.stderr)
        return 130
    if driver:
        print(f"job id: {driver} (submission {job_id})")
    return ray_jobs.report_end(job_id, status, message, url)


if __name__ == "__main__":
    sys.exit(main())
