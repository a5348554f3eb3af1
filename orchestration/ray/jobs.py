"""Ray Jobs: run a pipeline command on a Ray cluster with `ray job submit`'s API.

The project travels with the job: `runtime_env.working_dir` is the project root, zipped
without what is local state or large (EXCLUDES: the venv, run outputs, prepared data,
MLflow stores, .git), and the job's driver runs the pipeline command in that copy, which
Ray also puts on the PYTHONPATH of every worker the driver starts.

Addresses. The Jobs API is served by the cluster's dashboard (http://<head>:8265), but a
user's $RAY_ADDRESS is usually the GCS address `ray start` prints (<head>:6379).
`jobs_api_url` takes either: an http(s):// URL is the dashboard; a host:port that answers
HTTP like a dashboard is one; any other host:port is a GCS, and the dashboard address is
read from the GCS's key-value store (as Ray's own `ray job` CLI does). The address comes
from `address=`, else $RAY_API_SERVER_ADDRESS (Ray's variable for the Jobs API), else
$RAY_ADDRESS; it is probed first so an unreachable cluster fails in seconds with the
address it tried, not after the GCS client's 40 s of retries.

Token authentication (Ray >= 2.52): with RAY_AUTH_MODE=token, Ray's JobSubmissionClient and
GCS client send the token themselves (from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token) as `Authorization: Bearer <token>`. A token given without
RAY_AUTH_MODE switches token mode on (`enable_token_auth_if_given`), and a refused or
missing token is reported with the address and the variables to set.

The job's interpreter. A job's entrypoint is a shell command run by the job supervisor,
not a Ray worker, so runtime_env's `py_executable` (which Ray 2.60 applies to workers
only) does not choose it. On a cluster on this machine (a 127.0.0.1 head, as in the tests
or `ray start --head` on a workstation) the entrypoint names this interpreter
(sys.executable), whose venv holds the project's dependencies whatever PATH the head was
started with; on a remote cluster it is plain `python`, the node image's
(infra/docker/Dockerfile). "On this machine" is the head node's address as the cluster
reports it (`cluster_is_local`), not the URL's host: a 127.0.0.1 URL may be an SSH tunnel
to a cloud head. `python=` overrides either.

Tracking. $MLFLOW_TRACKING_URI travels in the job's environment. A URI on this machine's
127.0.0.1 is refused for a remote cluster, whose nodes cannot reach it (the rule
pipelines/train.py's run_meta applies to RAY_ADDRESS); without one, a remote job uses the
cluster's own (infra/ray/cluster.yaml sets it on every node).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, TextIO
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# gitignore-style patterns relative to the project root; a leading "/" anchors a pattern at
# the root (lzn/data/ is a package and must travel, /data/ is prepared shards and must not).
# Patterns without a trailing "/" match the directory itself, so Ray never walks the venv.
EXCLUDES = [
    "/.venv", "/.git", "/outputs", "/data", "/mlruns", "/mlartifacts", "/bench-results", "/build",
    "__pycache__", "*.egg-info", ".pytest_cache", "*.pyc", "*.db", "*.pt", "*.ckpt", "*.parquet",
]
# The local environment a job needs: tracking server, shards, caches of downloaded weights.
PASSED_ENV = ("MLFLOW_TRACKING_URI", "LZN_DATA_DIR", "LZN_CACHE_DIR")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PROBE_TIMEOUT_S = 5.0


class SubmitError(Exception):
    """A job that cannot be submitted: bad or unreachable address, refused token, bad setting."""


# --------------------------------------------------------------------------- addresses


def cluster_address(address: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The address the user means: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    for value in (address, env.get("RAY_API_SERVER_ADDRESS"), env.get("RAY_ADDRESS")):
        if value and value.strip():
            return value.strip().rstrip("/")
    raise SubmitError("no Ray cluster to submit to: set RAY_ADDRESS to the cluster's address (the GCS address "
                      "`ray start --head` prints, <head>:6379, or the dashboard's, http://<head>:8265), "
                      "or pass address=<...>")


def host_of(address: str) -> str:
    """The host of an http URL or a host:port address."""
    return urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""


def is_local(address: str) -> bool:
    """Whether `address` (a URL or host:port) names this machine."""
    host = host_of(address)
    return host in LOCAL_HOSTS or host.startswith("127.") or host == socket.gethostname()


def cluster_is_local(url: str) -> bool:
    """Whether the cluster whose dashboard is `url` runs on this machine: a loopback URL may be
    an SSH tunnel to a remote head (`ray dashboard cluster.yaml`), so ask the cluster where its
    head node is and compare with this machine's address."""
    if not is_local(url):
        return False
    from ray.util import get_node_ip_address
    from ray.util.state import list_nodes

    try:
        with _api_server_address(url):
            heads = list_nodes(address=url, filters=[("is_head_node", "=", True)], raise_on_missing_output=False)
        ours = {get_node_ip_address(), *LOCAL_HOSTS}
    except Exception as e:
        # Only a dashboard without the state API (404) lets the loopback address decide: any
        # other failure could be a tunnel to a remote head, which must not get this machine's
        # interpreter and paths.
        if "404" in str(e) or "Not Found" in str(e):
            return True
        raise SubmitError(f"could not ask the Ray cluster at {url} where its head node is ({type(e).__name__}: "
                          f"{str(e)[:300]}): is it a Ray {_ray_version()} dashboard?") from None
    return not heads or any(n.node_ip in ours or n.node_ip.startswith("127.") for n in heads)


def _ray_version() -> str:
    import ray

    return ray.__version__


def _split_host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:  # a port that is not a number
        port = None
    if not parts.hostname or port is None:
        raise SubmitError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379) nor an http(s):// "
                          "dashboard URL (e.g. http://10.0.0.5:8265)")
    return parts.hostname, port


def _check_listening(host: str, port: int, address: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise SubmitError(f"cannot reach the Ray cluster at {address}: {e}. Expected a running Ray head there "
                          "(`ray start --head`, or `ray up infra/ray/cluster.yaml`); check RAY_ADDRESS") from None


def _answers_like_dashboard(url: str) -> bool:
    """An HTTP answer on /api/version (200, or 401/403 under token authentication): a dashboard.
    A GCS port speaks gRPC, which an HTTP/1.1 client reads as a broken response."""
    import requests

    try:
        return requests.get(f"{url}/api/version", timeout=PROBE_TIMEOUT_S).status_code in (200, 401, 403)
    except requests.RequestException:
        return False


def _dashboard_from_gcs(address: str) -> str:
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.exceptions import AuthenticationError

    try:
        return ray_address_to_api_server_url(address)
    except AuthenticationError as e:
        raise SubmitError(auth_message(address, e)) from None
    except Exception as e:
        raise SubmitError(f"{address} accepts connections but is not a Ray GCS that names its dashboard "
                          f"({type(e).__name__}: {str(e)[:300]}). Expected RAY_ADDRESS=<head>:6379 (the GCS) or "
                          "http://<head>:8265 (the dashboard)") from None


def jobs_api_url(address: str) -> str:
    """The dashboard URL (Jobs API) of the cluster at `address`: see the module docstring."""
    if address.startswith("ray://"):
        raise SubmitError(f"{address} is a Ray Client address; Ray Jobs need the dashboard: set "
                          "RAY_ADDRESS=http://<head>:8265 (or the GCS address <head>:6379)")
    if "://" in address:
        scheme = address.split("://", 1)[0]
        if scheme not in ("http", "https"):
            raise SubmitError(f"Ray address {address!r} has scheme {scheme!r}; expected http(s)://<head>:8265 "
                              "or <head>:6379")
        return address
    if address == "auto":  # a cluster started on this machine, found through Ray's session files
        return _dashboard_from_gcs(address)
    host, port = _split_host_port(address)
    _check_listening(host, port, address)
    if _answers_like_dashboard(f"http://{address}"):
        return f"http://{address}"
    return _dashboard_from_gcs(address)


# --------------------------------------------------------------------------- authentication


def enable_token_auth_if_given(env=os.environ) -> None:
    """A token given ($RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH) without $RAY_AUTH_MODE means the
    user's cluster uses token authentication: turn Ray's client-side token mode on, before any
    Ray client reads its configuration, so every request carries the token."""
    if not env.get("RAY_AUTH_MODE") and (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_MODE"] = "token"


def auth_message(address: str, error: Exception) -> str:
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                     or (Path.home() / ".ray" / "auth_token").is_file())
    what = "refused the token sent" if has_token and mode == "token" else "needs a token and none was sent"
    return (f"the Ray cluster at {address} uses token authentication and {what} (RAY_AUTH_MODE={mode}). "
            "Set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file in RAY_AUTH_TOKEN_PATH, "
            f"or ~/.ray/auth_token; `ray get-auth-token` on the head prints it). Ray said: {str(error)[:300]}")


@contextlib.contextmanager
def _api_server_address(url: str):
    """JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its `address`
    argument: pin the URL resolved here so an explicit address= wins and no second lookup runs."""
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


def connect(address: str | None = None):
    """(JobSubmissionClient, dashboard URL) for the cluster at `address` (see cluster_address)."""
    enable_token_auth_if_given()  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    given = cluster_address(address)
    url = jobs_api_url(given)
    try:
        with _api_server_address(url):
            return JobSubmissionClient(url), url
    except AuthenticationError as e:
        raise SubmitError(auth_message(url, e)) from None
    except (ConnectionError, RuntimeError) as e:
        via = "" if url == given else f" (the dashboard of {given})"
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}{via}: {e}. Expected a Ray dashboard there: "
                          "start the head with --dashboard-host=0.0.0.0 (or tunnel with `ray dashboard "
                          "infra/ray/cluster.yaml`) and set RAY_ADDRESS=http://<head>:8265") from None


# --------------------------------------------------------------------------- the job


def runtime_env(*, local: bool, root: Path = PROJECT_ROOT, env: Mapping[str, str] = os.environ,
                extra_env: Mapping[str, str] | None = None) -> dict:
    """The job's runtime environment: the project as working_dir (EXCLUDES left out) and the
    PASSED_ENV variables set here. On a local cluster the shards default to the project's data/
    (what a local run uses) instead of the job's temporary copy of the project."""
    env_vars = {k: env[k] for k in PASSED_ENV if env.get(k)}
    if local:
        env_vars.setdefault("LZN_DATA_DIR", str(root / "data"))
    uri = env_vars.get("MLFLOW_TRACKING_URI")
    if uri:
        check_tracking_uri(uri, local=local, what="MLFLOW_TRACKING_URI")
    env_vars.update(extra_env or {})
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}


def check_tracking_uri(uri: str, *, local: bool, what: str) -> None:
    """A remote cluster's nodes cannot log to a server on this machine's loopback."""
    if not local and is_local(uri):
        raise SubmitError(f"{what}={uri} is a tracking server on this machine's loopback, which the nodes of a "
                          "remote Ray cluster cannot reach: set it to a server they can reach (infra/mlflow/), "
                          "or unset it to use the cluster's own (infra/ray/cluster.yaml), or pass "
                          "tracking.enabled=false")


def entrypoint(module: str, args: Iterable[str], *, python: str) -> str:
    """The shell command the job runs: `<python> -m <module> <args>`, each word quoted."""
    return shlex.join([python, "-m", module, *args])


def default_python(local: bool) -> str:
    return sys.executable if local else "python"


@contextlib.contextmanager
def _quiet_packaging():
    """Ray logs each packaging step at INFO and warns that it skips .git and .venv, which
    EXCLUDES names anyway: keep the submitter's output to what the user acts on."""
    names = ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
             "ray._private.runtime_env.working_dir", "ray.dashboard.modules.job.sdk")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def submit(client, command: str, env: dict, *, submission_id: str | None = None,
           metadata: dict[str, str] | None = None) -> str:
    """Submit `command` with runtime environment `env`; the submission id."""
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_packaging():
            return client.submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id,
                                     metadata=metadata or {})
    except AuthenticationError as e:
        raise SubmitError(auth_message(client.get_address(), e)) from None
    except (RuntimeError, ValueError) as e:  # refused: bad runtime_env, duplicate id, package too large
        hint = ""
        if "No available agent" in str(e):  # the head's dashboard agent runs jobs; it failed to serve
            hint = (". The head's dashboard agent is not serving HTTP: see dashboard_agent.log in the head's "
                    "session logs; a second Ray head on one machine needs its own --dashboard-agent-listen-port "
                    "(default 52365)")
        raise SubmitError(f"the Ray cluster at {client.get_address()} refused the job: {e}{hint}") from None


async def _tail(client, job_id: str, out: TextIO) -> None:
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client, job_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0) -> tuple[str, str, str | None]:
    """Stream the job's logs to `out` until it ends; (final status, status message, the Ray job
    id its driver got, None if it never started)."""
    try:
        asyncio.run(_tail(client, job_id, out))
    except Exception as e:  # the log stream broke (dashboard restart, network): follow the status
        print(f"\n[log stream of {job_id} broke ({type(e).__name__}: {e}); waiting for the job to end]",
              file=sys.stderr, flush=True)
    while True:  # the stream closes as the driver exits; the status follows a moment later
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return status, info.message or "", info.job_id
        time.sleep(poll_s)


def submission_id(task: str, mode: str) -> str:
    """A readable, unique submission id: lzn-<task>-<mode>-<UTC time>-<random>."""
    return f"lzn-{task}-{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(2).hex()}"


def report_end(job_id: str, status: str, message: str, url: str) -> int:
    """Print the job's outcome; the exit code a command returns for it."""
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", flush=True)
        return 0
    print(f"error: job {job_id} {status} on {url}" + (f": {message}" if message else "")
          + f" (logs: ray job logs {job_id} --address {url})", file=sys.stderr, flush=True)
    return 1
