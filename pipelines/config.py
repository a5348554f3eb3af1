"""Hydra wiring: every command's schema in the ConfigStore, so each YAML in pipelines/conf/ is
validated against typed dataclasses. A run (`orchestration.run.RunConfig`: lzn's task plus
where and how it runs) is what `pipelines.train` takes; the other commands extend it:
an evaluation (`EvalRun`), the stage DAG (`PipelineRun`), a sweep (`SweepRun`); the prepare
command takes a dataset alone (`PrepareRun`). Every field they add declares its role
(`lzn.roles`), as RunConfig's do. The config groups (conf/task, scale, hardware, sweep) are YAML
that fill fields of these schemas (`hardware=gpu`: `RunConfig.hardware`, `lzn.hardware.HardwareConfig`,
plus the trainer, device and bf16 settings a GPU run changes), so a group's typo fails like any other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lzn.errors import UserError
from lzn.roles import Role, Roles, role_field
from lzn.task import DataConfig
from orchestration.ray.tune import SweepConfig
from orchestration.run import RunConfig

STAGES = ("prepare", "train", "evaluate", "report")


@dataclass
class EvalRun(RunConfig):
    # a checkpoint file, a run folder, or an MLflow run id
    checkpoint: Optional[str] = role_field(Role.EVALUATION, default=None)
    # None: every metric the objective has (lzn.evaluate.METRICS)
    metrics: Optional[list[str]] = role_field(Role.EVALUATION, default=None)


@dataclass
class PipelineRun(EvalRun):
    stages: Optional[list[str]] = role_field(Role.RUNTIME, default=None)  # None: all of STAGES


@dataclass
class SweepRun(RunConfig):
    sweep: SweepConfig = role_field(Role.TASK, default_factory=SweepConfig)  # another sweep is another sweep.name


@dataclass
class PrepareRun:
    data: DataConfig = field(default_factory=DataConfig)


# What the command line of an evaluation decides (where and how it runs, how it evaluates);
# everything else, what was trained, comes from the training run's own config.
_EVAL_ROLES = Roles(PipelineRun)
EVAL_KEYS = _EVAL_ROLES.top_level([Role.RUNTIME, Role.EVALUATION])
DATA_EVAL_KEYS = _EVAL_ROLES.top_level([Role.RUNTIME], "data.")


def register() -> None:
    store = ConfigStore.instance()
    for name, schema in (("run_schema", RunConfig), ("eval_schema", EvalRun), ("pipeline_schema", PipelineRun),
                         ("sweep_schema", SweepRun), ("prepare_schema", PrepareRun)):
        store.store(name=name, node=schema)


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
        raise UserError(f"unknown config key(s) {[path + k for k in extra]}; valid keys at {where}: {sorted(fields)}")
    for key in fields:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, f"{path}{key}.")


def to_run_config(cfg: DictConfig):
    """The composed Hydra config as its validated, typed schema (RunConfig or one above); a
    value of the wrong type or an interpolation that does not resolve is bad input."""
    _reject_unknown_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"the config does not load: {e}") from None


def training_dcfg(dcfg: DictConfig) -> DictConfig:
    """The keys of a composed config that a plain training run has (`RunConfig`'s)."""
    return OmegaConf.masked_copy(dcfg, [f.name for f in dataclasses.fields(RunConfig)])


register()
