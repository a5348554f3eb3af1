"""The registered model on a real MLflow server: no pickle in it, loaded back by
mlflow.pyfunc to the same outputs, the alias on the newest version."""
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lzn.inference import LZNModel
from lzn.task import DataConfig, ModelConfig, TaskConfig, build_objective
from orchestration.mlflow.tracker import RunTracker
from orchestration.run import refused_changes

NAME = "lzn-model-test"


def _open(uri, run_dir):
    return RunTracker.open(uri, "lzn-model-tests", run_dir, run_name=Path(run_dir).name, params={"a": "1"},
                           config_yaml="a: 1\n", tags={}, refused_changes=refused_changes,
                           system_metrics=False, flush_every_s=0.2)


def test_the_registered_model_is_no_pickle_and_loads_back_to_the_same_outputs(server, tmp_path, monkeypatch):
    import mlflow.pyfunc

    cfg = TaskConfig(name="joint_test", objective="joint", model=ModelConfig(encoder="digits_cnn", decoder="unet_digits"),
                     data=DataConfig(image_size=8, channels=1, num_classes=10))
    torch.manual_seed(0)
    objective = build_objective(cfg).eval()
    with _open(server, tmp_path / "run") as t:
        t.on_log(1, {"loss": 0.5})
        first = t.register_model(objective, cfg, NAME, "candidate")
        second = t.register_model(objective, cfg, NAME, "candidate")
    client = MlflowClient(server)
    assert (first, second) == ("1", "2")
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert version.version == second and version.run_id == t.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate", dst_path=str(tmp_path / "dl")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    assert "loader_module: lzn.export" in (local / "MLmodel").read_text()
    weights = [local / f for f in files if f.endswith("lzn_model/weights.pt")]
    assert len(weights) == 1 and torch.load(weights[0], weights_only=True)  # tensors only

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    original = LZNModel(objective, (1, 8, 8))
    torch.testing.assert_close(torch.from_numpy(loaded.predict(images.numpy())), original.embed(images), rtol=0, atol=0)
    model = loaded.get_raw_model()
    torch.testing.assert_close(model.generate(3, seed=1, steps=2), original.generate(3, seed=1, steps=2), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected images \(N, 1, 8, 8\)"):
        loaded.predict(images[:, :, :4].numpy())
