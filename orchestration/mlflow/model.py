"""The registered model of a run: no pickle anywhere in it (loading a pickle runs code).

MLflow's pytorch flavour pickles the module (or needs torch.export and an input example).
Instead the EMA objective is saved by `lzn.export.save_model` (a state dict of tensors,
read back with torch.load(weights_only=True), and the task config as JSON) and logged as a
pyfunc model whose `loader_module` is `lzn.export`, with the lzn package as its code, so
`mlflow.pyfunc.load_model("models:/<name>@<alias>")` rebuilds the model from config and
weights; `.get_raw_model()` is the `LZNModel` (generate, embed, latents, classify).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import lzn

MODEL_NAME = "model"  # the logged model's name in the run
LOADER_MODULE = "lzn.export"


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's log_model only reads the global tracking URI. Set it for one call and put
    back both the global and $MLFLOW_TRACKING_URI (mlflow's own _use_tracking_uri unsets the
    variable on exit when no global URI was set before)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def pip_requirements() -> list[str]:
    import mlflow
    import numpy
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}"]


def log_lzn_model(uri: str, run_id: str, objective, cfg, name: str, *, step: int) -> str:
    """Log `objective` (with `cfg`'s task) as run `run_id`'s model, register it under `name`
    and return the new version."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from lzn.export import save_model

    with tempfile.TemporaryDirectory(prefix="lzn-model-") as tmp, global_tracking_uri(uri):
        data = save_model(objective, cfg, Path(tmp) / "lzn_model")
        # Model.log takes run_id (log_model does not): the model is linked to this run without
        # start_run, whose exit would end the run.
        info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         registered_model_name=name, await_registration_for=60, step=step,
                         loader_module=LOADER_MODULE, data_path=str(data),
                         code_paths=[str(Path(lzn.__file__).parent)], pip_requirements=pip_requirements())
    return str(info.registered_model_version)
