"""A trained model as plain files that load back without pickle (loading a pickle runs code).

    <folder>/model.json   {"format", "version", "image_shape": [C, H, W], "task": the TaskConfig}
    <folder>/weights.pt   the objective's state dict: tensors only, read with
                          torch.load(weights_only=True), which refuses anything else

`save_model(objective, cfg, folder)` writes them (the run registers the EMA objective this
way in MLflow); `load_model(folder)` rebuilds the objective from the task config with
`lzn.task.build_objective`, loads the weights strictly and returns an `LZNModel`:

    from lzn.export import load_model
    model = load_model("path/to/model")          # or MLflow: see _load_pyfunc
    images = model.generate(16, seed=0)

`_load_pyfunc(path)` is the MLflow pyfunc loader (the `loader_module` of the registered
model): `mlflow.pyfunc.load_model("models:/lzn-gen_digits@candidate")` calls it, and its
`predict(images (N, C, H, W) in [-1, 1])` returns the backbone features (N, F);
`.get_raw_model()` is the `LZNModel`.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lzn.errors import UserError

FORMAT, VERSION = "lzn.state_dict", 1
CONFIG_FILE, WEIGHTS_FILE = "model.json", "weights.pt"


def task_to_json(cfg) -> dict:
    """The TaskConfig fields of `cfg` (a TaskConfig or a subclass: a run's config) as JSON values."""
    from lzn.task import TaskConfig

    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(TaskConfig)}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def task_from_json(data: dict):
    """The TaskConfig that `task_to_json` wrote; an unknown key names itself."""
    from lzn.task import TaskConfig

    return _build(TaskConfig, data, "task")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown} for {cls.__name__}; expected some of {sorted(names)}")
    return cls(**{k: _value(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _value(hint, value, where: str):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
        return None if value is None else _value(args[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def save_model(objective: nn.Module, cfg, folder: str | Path) -> Path:
    """Write `objective`'s weights and `cfg`'s task (see the module doc) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in objective.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    meta = {"format": FORMAT, "version": VERSION,
            "image_shape": [cfg.data.channels, cfg.data.image_size, cfg.data.image_size], "task": task_to_json(cfg)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def load_model(folder: str | Path, device="cpu"):
    """The `LZNModel` saved in `folder` by `save_model`, rebuilt without unpickling anything."""
    from lzn.inference import LZNModel
    from lzn.task import build_objective

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} holds no {CONFIG_FILE}: not a model saved by lzn.export.save_model")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path} is format {meta.get('format')!r} version {meta.get('version')!r}; "
                        f"this lzn reads {FORMAT!r} version {VERSION}")
    objective = build_objective(task_from_json(meta["task"]))
    objective.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return LZNModel(objective, tuple(meta["image_shape"]), device)


class PyfuncModel:
    """What MLflow's pyfunc flavour wraps: `predict(images)` -> backbone features."""

    def __init__(self, model):
        self.model = model

    def predict(self, model_input, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.model.image_shape):
            raise UserError(f"expected images (N, {', '.join(map(str, self.model.image_shape))}) in [-1, 1], "
                            f"got shape {tuple(images.shape)}")
        return self.model.embed(images).numpy()

    def get_raw_model(self):
        return self.model


def _load_pyfunc(path: str) -> PyfuncModel:
    """MLflow's loader_module hook: the data folder of a registered lzn model -> its pyfunc."""
    return PyfuncModel(load_model(path))
