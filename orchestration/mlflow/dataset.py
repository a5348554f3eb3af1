"""A run's dataset as an MLflow input (`mlflow.data`): what fills the UI's Dataset column.

The dataset is the prepared one the run reads (<shards dir>/<name>/manifest.json): its name,
its digest (`lzn.data.shards.manifest_checksum`, the key the DAG and the evaluation caches
use too, cut to the DIGEST_CHARS MLflow stores, the whole of it in the profile: two runs on
different data, on a re-prepared folder whose images changed, or on another resize or
holdout, are told apart), its source (the raw data root the shards were prepared from, else
the shards folder) and a profile with the rows and classes of each split.
"""
from __future__ import annotations

import json
from pathlib import Path

from lzn.data.shards import manifest_checksum, read_manifest

CONTEXT = "training"  # the mlflow.data.context tag of the input
DIGEST_CHARS = 32  # 128 bits; MLflow refuses digests over 36 characters


def dataset_profile(manifest: dict) -> dict:
    """{"splits": {split: rows}, "classes": {split: n}, "source_kind": ..., "pixel_max": ...}."""
    splits = manifest["splits"]
    return {"splits": {s: int(e["rows"]) for s, e in sorted(splits.items())},
            "classes": {s: len(e.get("classes", {})) for s, e in sorted(splits.items())},
            "source_kind": manifest.get("source", {}).get("kind"), "pixel_max": manifest.get("pixel_max")}


def dataset_input(dataset_dir: str | Path):
    """The `mlflow.entities.DatasetInput` of the prepared dataset in `dataset_dir`."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    dataset_dir = Path(dataset_dir).resolve()
    manifest = read_manifest(dataset_dir)
    root = (manifest.get("source") or {}).get("root") or str(dataset_dir)
    checksum = manifest_checksum(manifest)
    profile = {**dataset_profile(manifest), "shards": str(dataset_dir), "checksum": checksum}

    class PreparedDataset(MetaDataset):  # MetaDataset has no profile; the UI shows this one
        @property
        def profile(self):
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    dataset = PreparedDataset(LocalArtifactDatasetSource(root), name=manifest["name"], digest=checksum[:DIGEST_CHARS])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", CONTEXT)])
