"""Where training data comes from, by dataset name. Digits ship with scikit-learn; the
other datasets are read from the Parquet shards that the data-preparation stage writes."""
from __future__ import annotations

from lzn.data.digits import digits_split


def load_training_data(data_cfg):
    """The train/test split of `data_cfg.name` as in-memory image tensors."""
    if data_cfg.name == "digits":
        return digits_split()
    where = data_cfg.root or f"data/{data_cfg.name}"
    raise FileNotFoundError(
        f"dataset {data_cfg.name!r} has no prepared shards at {where}: training on it needs the "
        "Parquet shards of the data-preparation stage (python -m pipelines.prepare), which is not "
        "available yet. Today only data.name=digits trains; the paper tasks are defined and their "
        "models build and step (see tests/lzn/test_task.py)."
    )
