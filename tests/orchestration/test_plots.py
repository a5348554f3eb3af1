"""Run artifacts: zone maps against a case with a known answer, and the PNGs every digits task writes."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lzn.data.digits import digits_split
from lzn.inference import LZNModel
from lzn.objectives import AlignConfig, LatentConfig
from lzn.task import DataConfig, EvalConfig, ModelConfig, TaskConfig, build_objective
from orchestration.plots import (
    GRID_PADDING,
    MIN_CELL_PX,
    image_grid,
    latent_zones,
    loss_curves,
    loss_figure,
    sample_grid,
    write_run_artifacts,
    zone_map,
)


# ------------------------------------------------------------------ stand-in and tasks
class LookupEncoder(nn.Module):
    """Images (N, 1, 1, 1) holding a row index -> that row of a fixed anchor table (N, q)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, images):
        return self.table[images.flatten(1)[:, 0].round().long()]


class FixedAnchors(nn.Module):
    """An objective whose encoder returns chosen anchors: zones we can predict."""

    def __init__(self, table: torch.Tensor, steps: int = 20, solver: str = "dpm++"):
        super().__init__()
        self.encoder = LookupEncoder(table)
        self.latent = LatentConfig(dim=table.shape[1], steps=steps, solver=solver, eps=1e-3, alpha=1.0)


def fixed_anchor_model(table: torch.Tensor) -> tuple[LZNModel, torch.Tensor]:
    return LZNModel(FixedAnchors(table), (1, 1, 1)), torch.arange(float(len(table))).view(-1, 1, 1, 1)


def digits_task(name: str) -> TaskConfig:
    """The digits task configs (pipelines/conf/task/*_digits.yaml) shrunk by scale=smoke;
    "rf" and "simclr" are the baselines (objective=rf on gen_digits, objective=simclr on repr_digits)."""
    data = DataConfig(name="digits", image_size=8, channels=1, num_classes=10)
    smoke_eval = dict(batch_size=8, sampler="euler", sampler_steps=2, fid_samples=16, probe_epochs=3, per_class=2)
    if name in ("gen_digits", "rf"):
        return TaskConfig(name="gen_digits", objective="generation" if name == "gen_digits" else "rf", data=data,
                          model=ModelConfig(encoder="digits_cnn", decoder="unet_digits"),
                          latent=LatentConfig(dim=16, steps=4, solver="dpm++", eps=1e-3, alpha=1.0),
                          eval=EvalConfig(**smoke_eval))
    if name == "joint_digits":
        return TaskConfig(name=name, objective="joint", data=data,
                          model=ModelConfig(encoder="digits_cnn", decoder="unet_digits"),
                          latent=LatentConfig(dim=16, steps=4, solver="dpm++", eps=1e-3, alpha=1.0),
                          align=AlignConfig(steps=5, solver="euler", eps=1e-3, cutoff=0.2, log=False),
                          eval=EvalConfig(**{**smoke_eval, "alpha": 0.0}))
    if name in ("repr_digits", "simclr"):
        return TaskConfig(name="repr_digits", objective="representation" if name == "repr_digits" else "simclr",
                          data=DataConfig(name="digits", augment="simclr_digits"),
                          model=ModelConfig(encoder="digits_cnn"),
                          latent=LatentConfig(dim=32, steps=4, solver="euler", eps=1e-4, alpha=0.45),
                          align=AlignConfig(steps=5, solver="euler", eps=1e-4, cutoff=0.2, log=True),
                          eval=EvalConfig(**smoke_eval))
    raise KeyError(name)


def smoke_model(name: str) -> tuple[TaskConfig, LZNModel]:
    cfg = digits_task(name)
    torch.manual_seed(0)
    return cfg, LZNModel(build_objective(cfg), (1, 8, 8))


@pytest.fixture(scope="module")
def split():
    return digits_split()


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


# ---------------------------------------------------------------------------- zone map
def test_zone_map_of_well_separated_anchors_has_the_known_zones():
    # Three far-apart anchors at 90, 210 and 330 degrees, the first listed twice: its two
    # copies share one zone of Gaussian mass 1/2 (argmax picks the first copy); the others 1/4.
    directions = [torch.tensor([math.cos(math.radians(a)), math.sin(math.radians(a))]) for a in (90, 210, 330)]
    table = 6.0 * torch.stack([directions[1], directions[0], directions[2], directions[0]])
    labels = torch.tensor([5, 2, 7, 2])  # labels unlike the indices: grid_labels must go through them
    model, images = fixed_anchor_model(table)
    res = 150
    z = zone_map(model, images, labels, batch_size=4, alpha=0.0, resolution=res)

    assert z["grid_zones"].shape == z["grid_labels"].shape == (res, res)
    assert z["points"].shape == (4, 2) and z["extent"] == (-3.0, 3.0, -3.0, 3.0)
    np.testing.assert_array_equal(z["basis"], np.eye(2))  # q = 2: the plane is the space itself
    np.testing.assert_array_equal(z["labels"], labels.numpy())
    np.testing.assert_array_equal(z["grid_labels"], labels.numpy()[z["grid_zones"]])
    assert set(np.unique(z["grid_zones"])) == {0, 1, 2}  # the duplicate (index 3) never wins a tie

    # Far out along each zone centre's direction lies that zone (row = v, column = u).
    centres = (np.arange(res) + 0.5) * 6.0 / res - 3.0
    for i in (0, 1, 2):
        u, v = 2.8 * z["points"][i] / np.linalg.norm(z["points"][i])
        row, col = np.abs(centres - v).argmin(), np.abs(centres - u).argmin()
        assert z["grid_zones"][row, col] == i, f"anchor {i}: the point {(u, v)} is in zone {z['grid_zones'][row, col]}"
        # ... and the zone centre points the way its anchor does.
        assert np.dot(z["points"][i], table[i].numpy()) / (np.linalg.norm(z["points"][i]) * 6.0) > 0.95

    # Zones partition N(0, I) by weight: Gaussian mass of each label's region.
    vv, uu = np.meshgrid(centres, centres, indexing="ij")
    density = np.exp(-(uu**2 + vv**2) / 2)
    density /= density.sum()
    mass = {k: density[z["grid_labels"] == k].sum() for k in (2, 5, 7)}
    assert mass[2] == pytest.approx(0.5, abs=0.03), mass
    assert mass[5] == pytest.approx(0.25, abs=0.03) and mass[7] == pytest.approx(0.25, abs=0.03), mass


def test_zone_map_plane_is_the_principal_plane_of_the_latents():
    # Anchors in the x-y plane of R^3, spread most along x: latents stay in that plane.
    table = torch.tensor([[6.0, 0, 0], [-6.0, 0, 0], [0, 3.0, 0], [0, -3.0, 0]])
    model, images = fixed_anchor_model(table)
    z = zone_map(model, images, torch.arange(4), batch_size=4, alpha=0.0, resolution=12)
    basis = z["basis"]
    assert basis.shape == (3, 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(basis, [[1, 0], [0, 1], [0, 0]], atol=1e-3)  # signs fixed positive
    assert z["grid_zones"].shape == (12, 12)


def test_zone_map_uses_only_the_first_batch_size_images():
    table = 6.0 * torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]])
    model, images = fixed_anchor_model(table)
    z = zone_map(model, images, torch.arange(4), batch_size=2, alpha=0.0, resolution=10)
    assert len(z["points"]) == 2 and set(np.unique(z["grid_zones"])) <= {0, 1}


@pytest.mark.parametrize("name, missing", [("rf", "GenerationObjective has no encoder"),
                                           ("simclr", "SimCLRObjective has no latent flow")])
def test_zone_map_refuses_models_without_lzn_latents(name, missing, split, tmp_path):
    _, model = smoke_model(name)
    images, labels = split.test_images[:8], split.test_labels[:8]
    with pytest.raises(ValueError, match=missing):
        zone_map(model, images, labels, batch_size=8, alpha=None)
    assert latent_zones(model, images, labels, tmp_path / "z.png", batch_size=8, alpha=None) is None
    assert not (tmp_path / "z.png").exists()


# ------------------------------------------------------------------------- loss curves
def _rows(n: int) -> list[dict]:
    rows = [{"step": 10 * i, "loss": 2.0 / i, "loss/rf": 1.0 / i, "train/grad_norm": 1 + (i % 3), "epoch": i // 7}
            for i in range(1, n + 1)]
    for row in rows[::2]:
        row["train/align_acc"] = 0.5  # a metric some rows lack
        row["note"] = "text"  # not a number: not a panel
    return rows


def test_loss_curves_one_titled_panel_per_metric_loss_first(tmp_path):
    fig = loss_figure(_rows(60))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "epoch", "loss/rf", "train/align_acc", "train/grad_norm"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title["loss"].lines) == 2  # 60 points: raw and smoothed
    assert len(by_title["train/align_acc"].lines) == 1  # 30 points: raw only
    np.testing.assert_array_equal(by_title["train/align_acc"].lines[0].get_xdata(), np.arange(10, 601, 20))

    path = loss_curves(_rows(60), tmp_path / "deep" / "loss_curves.png")
    image = Image.open(path)
    assert image.size == (3 * 400, 2 * 300)  # 5 panels: 3 columns, 2 rows of 400 x 300 px
    assert png(path).std() > 0


def test_loss_curves_refuses_rows_without_steps_or_metrics(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        loss_curves([], tmp_path / "l.png")
    with pytest.raises(ValueError, match="row 1 .*'step'|'step'.*row 1"):
        loss_curves([{"step": 1, "loss": 1.0}, {"loss": 0.5}], tmp_path / "l.png")
    with pytest.raises(ValueError, match="no numeric metric"):
        loss_curves([{"step": 1, "note": "x"}], tmp_path / "l.png")
    assert not (tmp_path / "l.png").exists()


# ------------------------------------------------------------------------ sample grids
def test_sample_grid_joint_has_one_row_per_class(tmp_path):
    cfg, model = smoke_model("joint_digits")
    path = sample_grid(model, cfg, tmp_path / "samples.png")
    cell = MIN_CELL_PX + GRID_PADDING  # 8 px digits upscaled x8, plus the padding
    image = png(path)
    assert image.shape[:2] == (cfg.data.num_classes * cell + GRID_PADDING, 10 * cell + GRID_PADDING)
    assert image.std() > 0


def test_sample_grid_rf_is_8x8_and_representation_has_none(tmp_path):
    cfg, model = smoke_model("rf")
    image = png(sample_grid(model, cfg, tmp_path / "rf.png"))
    assert image.shape[:2] == (8 * (MIN_CELL_PX + GRID_PADDING) + GRID_PADDING,) * 2
    cfg, model = smoke_model("repr_digits")
    assert sample_grid(model, cfg, tmp_path / "repr.png") is None
    assert not (tmp_path / "repr.png").exists()


def test_image_grid_upscales_small_images_by_whole_factors():
    grid = image_grid(torch.zeros(3, 3, 32, 32), nrow=3)  # 32 px: x2
    assert grid.shape == (3, 2 * 32 + 2 * GRID_PADDING, 3 * (64 + GRID_PADDING) + GRID_PADDING)
    assert image_grid(torch.zeros(2, 3, 100, 100), nrow=2).shape[-2:] == (108, 2 * 104 + GRID_PADDING)  # >= 64: x1


# ------------------------------------------------------------------------ all together
@pytest.mark.parametrize("name, expected", [
    ("gen_digits", {"samples.png", "loss_curves.png", "latent_zones.png"}),
    ("rf", {"samples.png", "loss_curves.png"}),
    ("joint_digits", {"samples.png", "loss_curves.png", "latent_zones.png"}),
    ("repr_digits", {"loss_curves.png", "latent_zones.png"}),
    ("simclr", {"loss_curves.png"}),
])
def test_write_run_artifacts_for_each_digits_task(name, expected, split, tmp_path):
    cfg, model = smoke_model(name)
    paths = write_run_artifacts(cfg, model, split, _rows(6), tmp_path / "artifacts")
    assert {p.name for p in paths} == expected
    assert {p.name for p in (tmp_path / "artifacts").iterdir()} == expected
    for p in paths:
        assert png(p).std() > 0, f"{p.name} is blank"
