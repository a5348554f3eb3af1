"""A trained model saved as a state dict and its task config, loaded back without pickle."""
import json
import pickle

import pytest
import torch

from lzn.errors import UserError
from lzn.export import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model, task_from_json, task_to_json
from lzn.inference import LZNModel
from lzn.task import DataConfig, ModelConfig, TaskConfig, build_objective


def _task(objective: str) -> TaskConfig:
    model = ModelConfig(encoder="digits_cnn", decoder="unet_digits")
    return TaskConfig(name=f"{objective}_test", objective=objective, model=model,
                      data=DataConfig(image_size=8, channels=1, num_classes=10))


class NotATensor:  # what a malicious pickle would bring: an object whose loading runs code
    pass


@pytest.mark.parametrize("objective", ["generation", "joint"])
def test_a_saved_model_loads_back_to_the_same_outputs_without_pickle(objective, tmp_path):
    cfg = _task(objective)
    torch.manual_seed(0)
    objective_module = build_objective(cfg).eval()
    original = LZNModel(objective_module, (1, 8, 8))
    save_model(objective_module, cfg, tmp_path / "model")

    weights = torch.load(tmp_path / "model" / WEIGHTS_FILE, weights_only=True)  # tensors only, or it raises
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    meta = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    assert meta["image_shape"] == [1, 8, 8] and meta["task"]["objective"] == objective

    loaded = load_model(tmp_path / "model")
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(loaded.embed(images), original.embed(images), rtol=0, atol=0)
    torch.testing.assert_close(loaded.generate(4, seed=3, steps=2), original.generate(4, seed=3, steps=2), rtol=0, atol=0)
    assert set(loaded.objective.state_dict()) == set(objective_module.state_dict())


def test_weights_that_are_not_tensors_are_refused(tmp_path):
    cfg = _task("generation")
    save_model(build_objective(cfg), cfg, tmp_path / "model")
    with (tmp_path / "model" / WEIGHTS_FILE).open("wb") as f:
        pickle.dump({"x": NotATensor()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True: nothing but tensors is unpickled
        load_model(tmp_path / "model")


def test_the_task_config_round_trips_through_json_and_unknown_keys_are_named():
    cfg = _task("joint")
    assert task_from_json(json.loads(json.dumps(task_to_json(cfg)))) == cfg
    data = task_to_json(cfg)
    data["model"]["encoderr"] = "x"
    with pytest.raises(UserError, match=r"task\.model: unknown keys \['encoderr'\]"):
        task_from_json(data)
