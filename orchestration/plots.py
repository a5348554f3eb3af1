"""The PNG artifacts a training run leaves at its end: samples, loss curves, latent zones.

This module only writes files; the tracking side uploads them. Figures are built on a bare
`matplotlib.figure.Figure` (the Agg canvas, no pyplot), so nothing depends on a display or
on pyplot's global state, and plotting is safe inside Ray workers.

- `sample_grid`: generated images, 8 x 8 (generation, rf) or one row per class (joint).
- `loss_curves`: one panel per training metric of a run's train_metrics.jsonl rows.
- `zone_map` / `latent_zones`: the zones of a batch of held-out images on a 2-D plane of
  the Gaussian latent space, each grid point coloured by the label of the zone it flows
  back to (`lzn.zoning.assign_zones`), with the images' own latents on top.
- `write_run_artifacts`: whichever of these apply to the task, into one folder.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lzn.inference import LZNModel
from lzn.task import TaskConfig
from lzn.zoning import assign_zones

MIN_CELL_PX = 64  # small images (digits are 8 x 8) are upscaled to at least this many pixels
GRID_PADDING = 4  # pixels of white between the cells of a sample grid
DPI = 100
EXTENT = (-3.0, 3.0, -3.0, 3.0)  # the square of the latent plane a zone map covers
SMOOTH_ABOVE = 50  # a loss curve with more points than this gets a smoothed line
_GRID_CHUNK = 8192  # grid points per assign_zones call: bounds the (chunk, N) posteriors

# The artifacts' file names, in the folder `write_run_artifacts` writes to.
SAMPLES_PNG = "samples.png"
LOSS_CURVES_PNG = "loss_curves.png"
LATENT_ZONES_PNG = "latent_zones.png"


# ------------------------------------------------------------------------------ samples
def _grid_layout(cfg: TaskConfig) -> tuple[int, Tensor | None, int] | None:
    """(number of samples, class labels (n,) or None, images per row) for cfg.objective;
    None when the objective has no decoder to sample from."""
    objective = cfg.objective
    if objective in ("generation", "rf"):
        return 64, None, 8
    if objective == "joint":
        per_row = 10  # one row per class, class-conditional
        return cfg.data.num_classes * per_row, torch.arange(cfg.data.num_classes).repeat_interleave(per_row), per_row
    if objective in ("representation", "simclr"):
        return None
    raise ValueError(f"sample_grid: unknown objective {objective!r}; expected one of "
                     f"['generation', 'joint', 'representation', 'rf', 'simclr']")


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """A (3, H', W') grid in [0, 1] of images (N, C, H, W) in [-1, 1], `nrow` per row, each
    upscaled by an integer factor (nearest neighbour: pixels stay sharp) to >= MIN_CELL_PX."""
    from torchvision.utils import make_grid

    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    scale = max(1, math.ceil(MIN_CELL_PX / min(images.shape[-2:])))
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=nrow, padding=GRID_PADDING, pad_value=1.0)


def sample_grid(model: LZNModel, cfg: TaskConfig, path: str | Path) -> Path | None:
    """Write a PNG of generated images; None (nothing written) for objectives without a decoder.

    cfg: `lzn.task.TaskConfig`. generation / rf: 8 x 8 samples; joint: num_classes rows of
    10 samples of that class. Sampled with cfg.eval.sampler / sampler_steps, seed cfg.eval.seed.
    """
    from torchvision.utils import save_image

    layout = _grid_layout(cfg)
    if layout is None:
        return None
    n, labels, per_row = layout
    images = model.generate(n, labels, method=cfg.eval.sampler, steps=cfg.eval.sampler_steps,
                            batch_size=n, seed=cfg.eval.seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(images, per_row), path)
    return path


# -------------------------------------------------------------------------- loss curves
def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (steps, values) over the rows that carry it; "loss" first, then by name."""
    if not rows:
        raise ValueError("loss_curves needs at least one row of training metrics, got an empty list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"every row needs a 'step' (rows as in train_metrics.jsonl); row {i} is {row!r}")
    names = sorted({k for row in rows for k, v in row.items() if k != "step" and _numeric(v)},
                   key=lambda k: (k != "loss", k))
    if not names:
        raise ValueError(f"the rows hold no numeric metric besides 'step'; first row: {rows[0]!r}")
    out = {}
    for name in names:
        pairs = [(row["step"], row[name]) for row in rows if _numeric(row.get(name))]
        steps, values = (np.asarray(c, dtype=float) for c in zip(*pairs))
        out[name] = (steps, values)
    return out


def _smoothed(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average over ~4% of the points (at least 5): the trend under the noise."""
    w = max(5, len(values) // 25)
    kept = np.isfinite(values)
    steps, values = steps[kept], values[kept]
    if len(values) < w:
        return steps, values
    mean = np.convolve(values, np.ones(w) / w, mode="valid")
    return steps[w // 2 : w // 2 + len(mean)], mean


def loss_figure(rows: list[dict]):
    """A matplotlib Figure with one titled panel per metric (loss first), x = step."""
    from matplotlib.figure import Figure

    series = _series(rows)
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows), dpi=DPI)
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        smooth = len(values) > SMOOTH_ABOVE
        ax.plot(steps, values, color="C0", alpha=0.35 if smooth else 1.0, lw=1,
                marker="o" if len(values) == 1 else None)
        if smooth:
            ax.plot(*_smoothed(steps, values), color="C0", lw=1.8)
        finite = values[np.isfinite(values)]
        # Losses that fall by orders of magnitude read better on a log axis.
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(rows: list[dict], path: str | Path) -> Path:
    """Write loss_figure(rows) as a PNG of (400 * cols) x (300 * rows) pixels, <= 3 columns.

    rows: as in a run's train_metrics.jsonl, [{"step": 1, "loss": ..., "train/grad_norm": ...}].
    A metric missing from some rows is drawn over the rows that have it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_figure(rows).savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------------- latent zones
def has_lzn_latents(model: LZNModel) -> bool:
    """Whether the model maps images to LZN latents: an encoder and a latent flow config
    (the rf baseline has no encoder, SimCLR's encoder has no latent flow)."""
    return hasattr(model.objective, "encoder") and hasattr(model.objective, "latent")


def plane_basis(latents: Tensor) -> Tensor:
    """An orthonormal basis (q, 2) of the plane through the origin spanned by the top two
    principal directions of latents (N, q); the identity when q = 2.

    Signs are fixed (each direction's largest entry positive) so the map is reproducible.
    """
    q = latents.shape[1]
    if q < 2:
        raise ValueError(f"a zone map needs a latent dimension >= 2, got {q}")
    if q == 2:
        return torch.eye(2, dtype=latents.dtype)
    centred = (latents - latents.mean(dim=0)).double()
    # Eigenvectors of the (q, q) scatter matrix, not an SVD of the (N, q) latents: the cost
    # stays O(N q^2) for large batches, and rank-deficient batches still give a plane.
    _, vectors = torch.linalg.eigh(centred.t() @ centred)  # ascending eigenvalues
    basis = vectors[:, [-1, -2]]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    return (basis * signs).to(latents.dtype)


@torch.no_grad()
def zone_map(model: LZNModel, images: Tensor, labels: Tensor, *, batch_size: int, alpha: float | None,
             seed: int = 0, resolution: int = 150) -> dict:
    """The zones of one inference batch on a 2-D plane of the latent space.

    images: (N, C, H, W) in [-1, 1], labels: (N,); the first `batch_size` are the batch.
    Anchors are their encoder outputs, latents model.latents(alpha) (alpha = 0: each zone's
    centre; None: the training alpha). The plane passes through the origin of N(0, I) along
    the latents' top two principal directions. Each point of a resolution x resolution grid
    over EXTENT is flowed back through the anchors' flow (the objective's latent steps,
    solver, eps) to its zone.

    Returns numpy arrays: "grid_zones" (res, res) anchor index and "grid_labels" (res, res)
    that anchor's label, row i / column j at plane coordinates (v_i, u_j) (imshow with
    origin="lower"); "points" (N, 2) the latents in plane coordinates; "labels" (N,);
    "extent" EXTENT; "basis" (q, 2).
    """
    if not has_lzn_latents(model):
        raise ValueError(f"zone_map needs a model with LZN latents (an encoder and a latent flow); "
                         f"{type(model.objective).__name__} has "
                         f"{'no encoder' if not hasattr(model.objective, 'encoder') else 'no latent flow config'}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    images, labels = images[:batch_size], torch.as_tensor(labels)[:batch_size]
    if len(images) < 2 or len(labels) != len(images):
        raise ValueError(f"need >= 2 images with one label each, got {len(images)} images and "
                         f"{len(labels)} labels (batch_size={batch_size})")
    flow = model.objective.latent
    anchors = model.objective.encoder(images.to(model.device)).float()  # (N, q)
    latents = model.latents(images, batch_size=len(images), alpha=alpha, seed=seed)  # (N, q), one batch
    basis = plane_basis(latents)  # (q, 2)
    lo, hi = EXTENT[0], EXTENT[1]
    centres = lo + (torch.arange(resolution, dtype=torch.float32) + 0.5) * (hi - lo) / resolution
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # rows follow v, columns u
    grid = torch.stack([u.reshape(-1), v.reshape(-1)], dim=1) @ basis.t()  # (res^2, q)
    zones = torch.cat([
        assign_zones(chunk.to(model.device), anchors, steps=flow.steps, solver=flow.solver, eps=flow.eps).cpu()
        for chunk in grid.split(_GRID_CHUNK)
    ]).view(resolution, resolution)
    labels = labels.cpu().long()
    return {
        "grid_zones": zones.numpy(),
        "grid_labels": labels[zones].numpy(),
        "points": (latents @ basis).numpy(),
        "labels": labels.numpy(),
        "extent": EXTENT,
        "basis": basis.numpy(),
    }


def _class_colours(labels: np.ndarray):
    """A qualitative colormap and the sorted classes; tab10 up to 10 classes, tab20 to 20."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    classes = np.unique(labels)
    top = int(classes.max()) + 1
    base = colormaps["tab10" if top <= 10 else "tab20" if top <= 20 else "turbo"]
    colours = base(np.arange(top) % base.N) if top <= 20 else base(np.linspace(0, 1, top))
    return ListedColormap(colours), classes, top


def _boundaries(grid: np.ndarray) -> np.ndarray:
    """(res, res) bool: cells whose right or upper neighbour lies in another region."""
    edge = np.zeros(grid.shape, dtype=bool)
    edge[:, :-1] |= grid[:, 1:] != grid[:, :-1]
    edge[:-1, :] |= grid[1:, :] != grid[:-1, :]
    return edge


def zone_figure(zmap: dict, title: str):
    """The Figure of a zone_map: label regions, zone and label boundaries, the latents."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cmap, classes, top = _class_colours(np.concatenate([zmap["labels"], zmap["grid_labels"].ravel()]))
    fig = Figure(figsize=(8.0, 6.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    extent, style = zmap["extent"], dict(origin="lower", interpolation="nearest")
    ax.imshow(zmap["grid_labels"], cmap=cmap, vmin=-0.5, vmax=top - 0.5, alpha=0.45, extent=extent, **style)
    for grid, rgba in ((zmap["grid_zones"], (1, 1, 1, 0.8)), (zmap["grid_labels"], (0, 0, 0, 0.9))):
        overlay = np.zeros(grid.shape + (4,))
        overlay[_boundaries(grid)] = rgba  # white: between zones; black: between labels
        ax.imshow(overlay, extent=extent, **style)
    pts = zmap["points"]
    ax.scatter(pts[:, 0], pts[:, 1], c=zmap["labels"], cmap=cmap, vmin=-0.5, vmax=top - 0.5, s=18,
               edgecolors="black", linewidths=0.6)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("principal direction 1")
    ax.set_ylabel("principal direction 2")
    ax.set_title(title, fontsize=10)
    if len(classes) <= 20:
        handles = [Patch(facecolor=cmap(int(c)), edgecolor="black", label=str(int(c))) for c in classes]
        ax.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        fig.colorbar(ax.collections[0], ax=ax, label="class")
    fig.tight_layout()
    return fig


def latent_zones(model: LZNModel, images: Tensor, labels: Tensor, path: str | Path, *, batch_size: int,
                 alpha: float | None, seed: int = 0, what: str = "images") -> Path | None:
    """Write the PNG of zone_map(...); None (nothing written) for a model without LZN latents.

    `what` names the images in the title, e.g. "held-out images".
    """
    if not has_lzn_latents(model):
        return None
    zmap = zone_map(model, images, labels, batch_size=batch_size, alpha=alpha, seed=seed)
    q = zmap["basis"].shape[0]
    plane = "the whole latent plane (q = 2)" if q == 2 else f"plane of the top two principal directions (q = {q})"
    alpha = model.objective.latent.alpha if alpha is None else alpha
    shown = "zone centres (alpha = 0)" if alpha == 0 else f"latents at alpha = {alpha:g}"
    title = (f"latent zones of {len(zmap['labels'])} {what}, {plane}\n"
             f"colour: label of the zone a point flows back to; dots: {shown}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    zone_figure(zmap, title).savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------------------- together
def write_run_artifacts(cfg: TaskConfig, model: LZNModel, split, rows: list[dict], out_dir: str | Path) -> list[Path]:
    """samples.png, loss_curves.png and latent_zones.png, each where it applies, into out_dir.

    cfg: `lzn.task.TaskConfig`; split: `lzn.data.reader.ImageSplit`, whose first
    cfg.eval.batch_size test images are the zones' batch (alpha cfg.eval.alpha); rows: the
    run's training metrics (no loss_curves.png when there are none). Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [sample_grid(model, cfg, out_dir / SAMPLES_PNG)]
    if rows:
        written.append(loss_curves(rows, out_dir / LOSS_CURVES_PNG))
    n = cfg.eval.batch_size
    written.append(latent_zones(model, split.test_images[:n], split.test_labels[:n], out_dir / LATENT_ZONES_PNG,
                                batch_size=n, alpha=cfg.eval.alpha, seed=cfg.eval.seed, what="held-out images"))
    return [p for p in written if p is not None]
