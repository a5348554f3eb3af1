"""Each run's dataset as an MLflow input on a real server: name, the manifest's checksum as
digest, source and rows per split; different data, different digests."""
import json
from pathlib import Path

from mlflow import MlflowClient

from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.data.resize import Target
from lzn.data.shards import manifest_checksum, read_manifest
from orchestration.mlflow.tracker import RunTracker
from orchestration.run import refused_changes
from tests.lzn.data import builders


def _open(uri, run_dir):
    return RunTracker.open(uri, "lzn-dataset-tests", run_dir, run_name=Path(run_dir).name, params={"a": "1"},
                           config_yaml="a: 1\n", tags={}, refused_changes=refused_changes, system_metrics=False,
                           flush_every_s=0.2)


def _prepare(raw: Path, out: Path, **kw) -> dict:
    prepare_dataset("imagefolder", str(raw), out, PrepareConfig(executor="serial"), **kw)
    return read_manifest(out)


def test_the_checksum_follows_the_shards_not_when_they_were_prepared(tmp_path):
    builders.image_folder(tmp_path / "raw")
    first = _prepare(tmp_path / "raw", tmp_path / "a" / "mine")
    again = _prepare(tmp_path / "raw", tmp_path / "b" / "mine")  # the same images prepared again elsewhere
    assert manifest_checksum(first) == manifest_checksum(again)
    assert len(manifest_checksum(first)) == 64
    # the same images resized for a model are other data (the DAG and the evaluation caches use this key too)
    resized = _prepare(tmp_path / "raw", tmp_path / "r" / "mine", target=Target(size=8, channels=1))
    assert manifest_checksum(resized) != manifest_checksum(first)
    builders.image_folder(tmp_path / "raw", seed=1)  # other pixels under the same names
    assert manifest_checksum(_prepare(tmp_path / "raw", tmp_path / "c" / "mine")) != manifest_checksum(first)


def test_each_run_logs_its_dataset_and_two_datasets_are_told_apart(server, tmp_path):
    client = MlflowClient(server)
    digests = {}
    for seed in (0, 1):
        raw = tmp_path / f"raw{seed}"
        builders.image_folder(raw, seed=seed)
        data = tmp_path / f"shards{seed}" / "pets"
        manifest = _prepare(raw, data)
        with _open(server, tmp_path / f"run{seed}") as t:
            t.log_dataset(data)
        inputs = client.get_run(t.run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        dataset = inputs[0].dataset
        assert dataset.name == "pets" and dataset.digest == manifest_checksum(manifest)[:32]
        assert str(raw.resolve()) in dataset.source
        profile = json.loads(dataset.profile)
        assert profile["checksum"] == manifest_checksum(manifest)
        assert profile["splits"] == {s: e["rows"] for s, e in manifest["splits"].items()}
        assert {tag.key: tag.value for tag in inputs[0].tags}["mlflow.data.context"] == "training"
        digests[seed] = dataset.digest
    assert digests[0] != digests[1]
