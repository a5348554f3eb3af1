"""A task: the typed schema of one training run, and the registry that builds its objective.

The dataclasses are the schema that `pipelines` registers with Hydra; YAML files only fill
values, so an unknown key or a wrong type fails when the config loads. Objectives are
built from an explicit registry (a human name -> a builder), checked at load time too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from lzn.data.holdout import check_fraction
from lzn.data.prepare import EXECUTORS, PrepareConfig
from lzn.errors import UserError
from lzn.models import build_decoder, build_encoder
from lzn.models.anchors import LabelAnchors
from lzn.models.presets import AUTO, preset_for
from lzn.objectives import (
    AlignConfig,
    GenerationObjective,
    JointObjective,
    LatentConfig,
    RepresentationObjective,
    SimCLRObjective,
)
from lzn.roles import Role, role_field
from lzn.trainer import OptimConfig, TrainConfig


@dataclass
class DataConfig:
    # The dataset; its shards live in <shards_dir>/<name>/.
    name: str = role_field(Role.TASK, default="digits")
    # How to read the raw data (lzn.data.sources.SOURCES); None: same as name.
    source: Optional[str] = role_field(Role.TASK, default=None)
    # The raw data: archives or an image tree (digits needs none).
    root: Optional[str] = role_field(Role.RUNTIME, default=None)
    # imagefolder: the split folders to read (None: those found).
    splits: Optional[list[str]] = role_field(Role.TRAINING, default=None)
    # Data without a test or val split: this fraction of each class is held out as "test",
    # picked with holdout_seed (lzn.data.holdout; 0: none). A split the data has is kept.
    holdout: float = role_field(Role.TRAINING, default=0.1)
    holdout_seed: int = role_field(Role.TRAINING, default=0)
    shards_dir: str = role_field(Role.RUNTIME, default="data")  # where prepared datasets live
    image_size: int = role_field(Role.TASK, default=8)
    channels: int = role_field(Role.TASK, default=1)
    num_classes: int = role_field(Role.TASK, default=10)
    augment: str = role_field(Role.TRAINING, default="none")  # lzn.data.augment.PIPELINES
    # How training reads the train split: memory (every worker holds it as uint8; batches are a
    # function of (seed, step)), stream (each worker streams its part of the rows, shuffled per
    # epoch: Ray Data on backend=ray, a DataLoader over the shards on the local/torchrun backend;
    # for datasets too large or of mixed image sizes), auto (memory when it fits).
    loader: str = role_field(Role.RUNTIME, default="auto")
    # DataLoader processes per rank decoding the shards (data.loader=stream, local/torchrun backend).
    loader_workers: int = role_field(Role.RUNTIME, default=2)
    prepare: PrepareConfig = role_field(Role.RUNTIME, default_factory=PrepareConfig)

    @property
    def source_name(self) -> str:
        return self.source or self.name

    @property
    def dataset_dir(self) -> Path:
        return Path(self.shards_dir) / self.name


@dataclass
class ModelConfig:
    encoder: Optional[str] = None  # lzn.models.ENCODERS, or auto: sized from data.image_size (lzn.models.presets)
    decoder: Optional[str] = None  # lzn.models.DECODERS, or auto
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    decoder_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    batch_size: int = 256  # the inference batch: LZN latents depend on it
    alpha: Optional[float] = None  # latent noise scale at inference (None: the training value)
    sampler: str = "euler"  # image ODE: euler or rk45
    sampler_steps: int = 10
    fid_samples: int = 0  # 0: as many as the reference (training) set
    # digits_cnn (8x8 digits), inception (the standard FID; needs its weights) or pixels (Frechet
    # distance of pixels pooled to 8x8, lzn.metrics.pixel_features: no network, not comparable to FID)
    fid_features: str = "digits_cnn"
    inception_weights: Optional[str] = role_field(Role.RUNTIME, default=None)
    probe_epochs: int = 300
    probe_lr: float = 3e-4  # the paper's; small datasets need more (digits: 3e-3)
    probe_batch_size: int = 256  # the probe's SGD batch (the probe trains on the evaluating worker's device)
    # The probe's images: shorter side resized to this, then centre-cropped to data.image_size
    # (0: to data.image_size, no margin). repr_imagenet: 256, the reference's Resize(256) + CenterCrop(224).
    probe_resize: int = 0
    # Standardise the probe's features with the training set's mean and std. The reference
    # feeds them raw (False); True lets one lr suit backbones whose feature scales differ a lot.
    probe_standardize: bool = False
    per_class: int = 100  # conditional generation: samples per class
    seed: int = 0
    # Beside FID, from the same features: Inception Score over `is_splits` groups, KID and
    # precision/recall on a fixed seeded subset of `kid_pr_samples` rows of each set (0: no
    # KID or precision/recall), and the same metrics of an Euler 10-step set (eval/*_euler10),
    # which the paper logs beside its RK45 FIDs; also the reconstruction error of Euler in 10
    # steps (eval/reconstruction_l2_euler10), as the reference runs it for each sampler.
    is_splits: int = 10
    kid_pr_samples: int = 10_000
    fid_euler10: bool = False
    # Reconstruction error as the reference measures it: `reconstruction_samples` training
    # images of a seed-0 permutation (0: all; the reference: 2000 for CIFAR10, 256 at 256 px), each
    # reconstructed from `reconstruction_draws` latents of independent latent noise.
    reconstruction_samples: int = 2000
    reconstruction_draws: int = 20
    # Samples per evaluation shard (0: lzn.evaluate.DEFAULT_CHUNK), rounded up to whole
    # inference batches. Metrics do not depend on it; a crash loses at most one shard.
    chunk_size: int = 0


@dataclass
class TaskConfig:
    name: str = role_field(Role.TASK, default="gen_digits")
    objective: str = role_field(Role.TASK, default="generation")  # OBJECTIVES
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = role_field(Role.MODEL, default_factory=ModelConfig)
    latent: LatentConfig = role_field(Role.MODEL, default_factory=LatentConfig)
    align: AlignConfig = role_field(Role.MODEL, default_factory=AlignConfig)
    optim: OptimConfig = role_field(Role.TRAINING, default_factory=OptimConfig)
    train: TrainConfig = role_field(Role.TRAINING, default_factory=TrainConfig)
    eval: EvalConfig = role_field(Role.EVALUATION, default_factory=EvalConfig)
    symmetric: bool = role_field(Role.MODEL, default=False)  # representation: align both directions
    simclr_temperature: float = role_field(Role.TRAINING, default=0.5)


def model_presets(cfg: TaskConfig) -> tuple[tuple[Optional[str], dict], tuple[Optional[str], dict]]:
    """(encoder name, overrides), (decoder name, overrides) that the task builds: `auto`
    resolved from data.image_size (lzn.models.presets.preset_for), the task's overrides on top."""
    m = cfg.model
    sized = None
    if AUTO in (m.encoder, m.decoder):
        sized = preset_for(cfg.data.image_size, decoder=cfg.objective not in TWO_VIEW_OBJECTIVES)
    encoder = ((sized.encoder, {**sized.encoder_overrides, **m.encoder_overrides}) if m.encoder == AUTO
               else (m.encoder, dict(m.encoder_overrides)))
    decoder = ((sized.decoder, {**sized.decoder_overrides, **m.decoder_overrides}) if m.decoder == AUTO
               else (m.decoder, dict(m.decoder_overrides)))
    return encoder, decoder


def _encoder(cfg: TaskConfig) -> nn.Module:
    (name, overrides), _ = model_presets(cfg)
    if not name:
        raise UserError(f"objective {cfg.objective!r} needs model.encoder")
    return build_encoder(name, latent_dim=cfg.latent.dim, image_size=cfg.data.image_size,
                         channels=cfg.data.channels, **overrides)


def _decoder(cfg: TaskConfig, cond_dim: int) -> nn.Module:
    _, (name, overrides) = model_presets(cfg)
    if not name:
        raise UserError(f"objective {cfg.objective!r} needs model.decoder (a representation task has none)")
    return build_decoder(name, image_size=cfg.data.image_size, channels=cfg.data.channels,
                         cond_dim=cond_dim, **overrides)


OBJECTIVES: dict[str, Callable[[TaskConfig, Any], nn.Module]] = {
    # Case study 1: RF + LZN, and the plain RF baseline at the same budget.
    "generation": lambda c, g: GenerationObjective(_encoder(c), _decoder(c, c.latent.dim), c.latent, g),
    "rf": lambda c, g: GenerationObjective(None, _decoder(c, 0), c.latent, g),
    # Case study 2 and its SimCLR baseline.
    "representation": lambda c, g: RepresentationObjective(_encoder(c), c.latent, c.align, c.symmetric, g),
    "simclr": lambda c, g: SimCLRObjective(_encoder(c), c.simclr_temperature, g),
    # Case study 3.
    "joint": lambda c, g: JointObjective(
        _encoder(c), _decoder(c, c.latent.dim + c.data.num_classes),
        LabelAnchors(c.data.num_classes, c.latent.dim), c.latent, c.align, g),
}

TWO_VIEW_OBJECTIVES = {"representation", "simclr"}
LOADERS = ("auto", "memory", "stream")


def build_objective(cfg: TaskConfig, gather=None) -> nn.Module:
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {cfg.objective!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg, gather)


def validate_task(cfg: TaskConfig) -> None:
    """Check every name against its registry and every range, before anything trains."""
    from lzn.data.augment import PIPELINES
    from lzn.data.sources import SOURCES
    from lzn.models import DECODERS, ENCODERS
    from lzn.sampling import METHODS
    from lzn.solvers import SOLVERS

    def one_of(what: str, value, known) -> None:
        if value not in known:
            raise UserError(f"{what}={value!r} is not known; expected one of {sorted(known)}")

    def positive(what: str, value) -> None:
        if not value > 0:
            raise UserError(f"{what} must be > 0, got {value}")

    one_of("objective", cfg.objective, OBJECTIVES)
    if cfg.model.encoder is not None:
        one_of("model.encoder", cfg.model.encoder, [*ENCODERS, AUTO])
    if cfg.model.decoder is not None:
        one_of("model.decoder", cfg.model.decoder, [*DECODERS, AUTO])
    model_presets(cfg)  # an image size that no preset is sized for fails here, naming the valid ones
    one_of("data.augment", cfg.data.augment, PIPELINES)
    one_of("data.source", cfg.data.source_name, SOURCES)
    one_of("data.prepare.executor", cfg.data.prepare.executor, EXECUTORS)
    one_of("data.loader", cfg.data.loader, LOADERS)
    one_of("latent.solver", cfg.latent.solver, SOLVERS)
    one_of("align.solver", cfg.align.solver, SOLVERS)
    one_of("eval.sampler", cfg.eval.sampler, METHODS)
    one_of("eval.fid_features", cfg.eval.fid_features, ("digits_cnn", "inception", "pixels"))
    if (cfg.objective not in TWO_VIEW_OBJECTIVES and cfg.eval.fid_features == "digits_cnn"
            and (cfg.data.image_size, cfg.data.channels) != (8, 1)):
        raise UserError(f"eval.fid_features=digits_cnn reads 8x8 grey digits, not {cfg.data.image_size}x"
                        f"{cfg.data.image_size}x{cfg.data.channels} images: use eval.fid_features=inception "
                        "(with its weights) or pixels")
    check_fraction(cfg.data.holdout)
    if cfg.data.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {cfg.data.channels}")
    for what in ("latent.dim", "latent.steps", "align.steps", "train.iterations", "train.batch_size",
                 "train.checkpoint_every", "train.log_every", "eval.batch_size", "eval.probe_batch_size", "data.image_size",
                 "data.channels", "data.num_classes", "eval.sampler_steps", "eval.probe_epochs", "eval.probe_lr"):
        section, key = what.split(".")
        positive(what, getattr(getattr(cfg, section), key))
    if cfg.eval.probe_resize and cfg.eval.probe_resize < cfg.data.image_size:
        raise UserError(f"eval.probe_resize must be 0 or >= data.image_size = {cfg.data.image_size} (it is the "
                        f"shorter side before the centre crop), got {cfg.eval.probe_resize}")
    if cfg.eval.chunk_size < 0 or cfg.eval.fid_samples < 0:
        raise UserError(f"eval.chunk_size and eval.fid_samples must be >= 0 (0: the default), got "
                        f"{cfg.eval.chunk_size} and {cfg.eval.fid_samples}")
    for what, alpha in (("latent.alpha", cfg.latent.alpha), ("eval.alpha", cfg.eval.alpha)):
        if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
            raise UserError(f"{what} must be a finite number >= 0, got {alpha}")
    if not 0 < cfg.latent.eps < 1 or not 0 < cfg.align.eps < 1:
        raise UserError(f"latent.eps and align.eps must lie in (0, 1), got {cfg.latent.eps}, {cfg.align.eps}")
    if not 0 < cfg.align.zone_eps < 1:
        raise UserError(f"align.zone_eps must lie in (0, 1), got {cfg.align.zone_eps}")
    if not 0 <= cfg.align.cutoff < 1:
        raise UserError(f"align.cutoff must lie in [0, 1), got {cfg.align.cutoff}")
    for what, flow in (("latent", cfg.latent), ("align", cfg.align)):
        if flow.solver != "euler" and flow.eps >= 0.5:
            raise UserError(f"{what}.eps must be < 0.5 with {what}.solver={flow.solver} (its grid runs from eps "
                            f"to 1 - eps), got {flow.eps}")
    if cfg.eval.is_splits < 1:
        raise UserError(f"eval.is_splits must be >= 1, got {cfg.eval.is_splits}")
    if cfg.eval.kid_pr_samples != 0 and cfg.eval.kid_pr_samples < 4:
        raise UserError("eval.kid_pr_samples must be 0 (no KID or precision/recall) or >= 4 (precision/recall "
                        f"use each row's 3 nearest neighbours), got {cfg.eval.kid_pr_samples}")
    if cfg.eval.reconstruction_samples < 0 or cfg.eval.reconstruction_draws < 1:
        raise UserError(f"eval.reconstruction_samples must be >= 0 and eval.reconstruction_draws >= 1, got "
                        f"{cfg.eval.reconstruction_samples} and {cfg.eval.reconstruction_draws}")
    for name, lr in cfg.optim.lr.items():
        positive(f"optim.lr.{name}", lr)
