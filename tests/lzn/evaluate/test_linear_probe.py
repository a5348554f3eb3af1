"""lzn.evaluate.linear_probe, as the reference's probe: both splits' images through
Resize(probe_resize) + CenterCrop(image_size), features raw unless eval.probe_standardize."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lzn import evaluate as ev
from lzn.evaluate import linear_probe
from lzn.eval_data import InMemoryData, ShardData
from lzn.data.prepare import PrepareConfig, prepare_dataset
from lzn.objectives import AlignConfig, LatentConfig
from lzn.task import DataConfig, EvalConfig, ModelConfig, TaskConfig, validate_task


def repr_cfg(shards: Path, **eval_overrides) -> TaskConfig:
    return TaskConfig(name="repr_folder", objective="representation",
                      data=DataConfig(name="folder", source="imagefolder", shards_dir=str(shards), image_size=8,
                                      channels=3, num_classes=2),
                      model=ModelConfig(encoder="digits_cnn"), latent=LatentConfig(dim=8, steps=2),
                      align=AlignConfig(steps=2), eval=EvalConfig(batch_size=4, **eval_overrides))


class PixelModel:
    """Embeds an image as its pixels, so the probe's inputs are the images it was given."""

    def embed(self, images, *, batch_size):
        return images.flatten(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Images of several aspect ratios, each with a bright border 3 px wide: a crop that keeps
    the whole field of view (resize 8) shows the border, a crop with a margin (resize 12,
    the 256/224 of ImageNet scaled up) does not."""
    raw = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, (h, w) in enumerate([(24, 36), (40, 24)]):
            for i in range(3):
                img = np.full((h, w, 3), 60, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
                img[:3], img[-3:], img[:, :3], img[:, -3:] = 250, 250, 250, 250
                (raw / split / str(c)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(raw / split / str(c) / f"{i}.png")
    shards = tmp_path_factory.mktemp("shards")
    prepare_dataset("imagefolder", str(raw), shards / "folder", PrepareConfig(executor="serial"), progress=False)
    return shards


@pytest.mark.parametrize("resize", [0, 12])
def test_probe_images_are_resized_then_centre_cropped(folder, resize):
    from lzn.data.reader import ShardDataset, square_pixels, to_float

    cfg = repr_cfg(folder, probe_resize=resize)
    data = ShardData(folder / "folder", image_size=8, channels=3)
    evaluator = ev.Evaluator(cfg, PixelModel(), data, cache_dir=folder / "cache")
    for kind, split in (("probe_train", "train"), ("probe_test", "val")):
        part = evaluator.run(ev.Unit(kind, 0, 0, 6))
        pixels, _ = ShardDataset(folder / "folder", split).pixels(range(6))
        expected = torch.stack([to_float(square_pixels(p, 8, resize or None), 255) for p in pixels]).flatten(1)
        torch.testing.assert_close(part["features"], expected)
        crops = part["features"].view(6, 3, 8, 8)
        # The edge of the shorter side: the top row of a wide image, the left column of a tall one.
        edge = torch.maximum(crops[:, :, 0, :].mean(dim=(1, 2)), crops[:, :, :, 0].mean(dim=(1, 2)))
        assert (edge > 0.5).all() if resize == 0 else (edge < 0.0).all()


def test_in_memory_images_get_the_same_resize(folder):
    from lzn.data.reader import ImageSplit, resize_centre_crop

    images = torch.rand(4, 3, 8, 8) * 2 - 1
    split = ImageSplit(images, torch.arange(4), images, torch.arange(4))
    got, _ = InMemoryData(split).rows("test", 0, 4, resize=12)
    torch.testing.assert_close(got, resize_centre_crop(images, 12))
    assert not torch.allclose(got, images)


def test_standardisation_is_a_setting_and_raw_is_the_default(folder, monkeypatch):
    seen = {}
    monkeypatch.setattr(linear_probe.metrics, "linear_probe",
                        lambda *a, **kw: seen.update(kw) or {"top1": 1.0, "top5": 1.0})
    store = ev.PartStore(folder / "parts")
    unit = ev.Unit("probe_train", 0, 0, 2)
    store.save(unit, {"features": torch.zeros(2, 3), "labels": torch.tensor([0, 1])})
    ev.train_probe(repr_cfg(folder), store, [unit], [unit])
    assert seen["standardize"] is False
    ev.train_probe(repr_cfg(folder, probe_standardize=True, probe_batch_size=8192), store, [unit], [unit])
    assert seen["standardize"] is True and seen["batch_size"] == 8192


def test_a_probe_resize_below_the_image_size_is_refused(folder):
    with pytest.raises(ValueError, match="eval.probe_resize must be 0 or >= data.image_size = 8.*got 6"):
        validate_task(repr_cfg(folder, probe_resize=6))


@pytest.mark.parametrize("progress", [True, False])
def test_the_evaluations_progress_reaches_the_probe(folder, monkeypatch, progress):
    # evaluate(progress=False) (a sweep trial's checkpoint evaluation) draws no probe bar.
    seen = {}
    monkeypatch.setattr(linear_probe.metrics, "linear_probe",
                        lambda *a, **kw: seen.update(kw) or {"top1": 1.0, "top5": 1.0})
    cfg = repr_cfg(folder)
    data = ShardData(folder / "folder", image_size=8, channels=3)
    evaluator = ev.Evaluator(cfg, PixelModel(), data, cache_dir=folder / "cache")
    store = ev.PartStore(folder / f"parts-{progress}")
    out = ev.evaluate(cfg, chosen=["linear_probe"], data=data, store=store,
                      execute=ev.execute_here(evaluator, store, progress=False), extractor=lambda: None,
                      progress=progress)
    assert out["eval/linear_probe_top1"] == 1.0 and seen["progress"] is progress
