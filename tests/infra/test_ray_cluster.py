"""infra/ray/cluster.yaml against Ray's own cluster-config validation (what `ray up` runs
before it launches anything: defaults merged, then the JSON schema shipped in the ray
package and its cross-field checks), plus what the platform needs from the cluster."""
import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "ray" / "cluster.yaml"
SHARED = "/mnt/shared"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_validate(config: dict) -> dict:
    """`ray up`'s validation: defaults for the provider merged in, then the schema and checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def run_env(config: dict) -> dict[str, str]:
    """The environment the docker run options give every Ray process on every node."""
    return dict(m.groups() for o in config["docker"]["run_options"] if (m := re.fullmatch(r"--env (\w+)=(\S+)", o)))


def test_the_cluster_config_passes_rays_own_validation(config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # as written, before any default fills a gap
    prepared = ray_validate(config)
    assert prepared["head_node_type"] == "head"
    assert prepared["provider"]["type"] == "aws"


def test_gpu_workers_autoscale_from_zero_and_the_head_trains_nothing(config):
    types = config["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert list(gpu) == ["gpu_worker"], "one GPU worker type"
    worker = gpu["gpu_worker"]
    assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    assert worker["resources"]["CPU"] >= worker["resources"]["GPU"]  # a CPU beside each GPU worker
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0


def test_every_node_shares_storage_tracking_and_the_token(config):
    from pipelines.submit import REMOTE_OUTPUT_DIR

    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    assert any(f"{SHARED}" in c and "mount" in c for c in config["initialization_commands"])
    env = run_env(config)
    for key in ("LZN_DATA_DIR", "LZN_OUTPUT_DIR", "LZN_CACHE_DIR"):  # shards, run folders + checkpoints, weights
        assert env[key].startswith(SHARED + "/"), (key, env.get(key))
    assert "LZN_OUTPUT_DIR" in REMOTE_OUTPUT_DIR  # the variable a submitted job's run folder follows
    assert re.fullmatch(r"https?://[\w.-]+:\d+", env["MLFLOW_TRACKING_URI"])
    assert not re.search(r"//(127\.|localhost)", env["MLFLOW_TRACKING_URI"]), "workers cannot reach a loopback server"
    assert env["RAY_AUTH_MODE"] == "token"
    token_dir = os.path.dirname(env["RAY_AUTH_TOKEN_PATH"])
    assert token_dir in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--port=6379" in head_start and "--dashboard-host=0.0.0.0" in head_start  # GCS and Jobs API


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(max_worker=8), jsonschema.ValidationError),  # a typo of a top-level key
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="4"), jsonschema.ValidationError),
    (lambda c: c["docker"].update(imag="x"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="cpu_head"), ValueError),  # not one of the node types
])
def test_a_broken_copy_fails_validation(config, breakage, error):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises(error):
        ray_validate(broken)
