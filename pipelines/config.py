"""Hydra wiring: the run schema (lzn's TaskConfig plus where and how to run) in the
ConfigStore, so every YAML in pipelines/conf/ is validated against typed dataclasses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lzn.task import TaskConfig
from orchestration.ray.train import RayTrainerConfig
from orchestration.mlflow.tracker import TrackingConfig

BACKENDS = ("local", "ray")


@dataclass
class RunConfig(TaskConfig):
    output_dir: str = "outputs"
    scale: str = "full"  # set by the scale group (conf/scale/*.yaml)
    # One folder per (task, scale, seed) unless named: re-running the same command resumes it.
    run_name: str = "${scale}-seed${train.seed}"
    resume: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu (the local backend)
    # local: this process (or torchrun's); ray: Ray Train workers on $RAY_ADDRESS or a local Ray.
    backend: str = "local"
    trainer: RayTrainerConfig = field(default_factory=RayTrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _reject_unknown_keys(node, path: str = "") -> None:
    """Hydra's `+key=value` can force a key into a structured config, and
    OmegaConf.to_object would then drop it silently: refuse it instead."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    extra = sorted(set(node.keys()) - fields)
    if extra:
        where = path.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key(s) {[path + k for k in extra]}; valid keys at {where}: {sorted(fields)}")
    for key in fields:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, f"{path}{key}.")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The composed Hydra config as a validated, typed RunConfig."""
    _reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)
