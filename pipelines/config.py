"""Hydra wiring: the run schema (lzn's TaskConfig plus where and how to run) in the
ConfigStore, so every YAML in pipelines/conf/ is validated against typed dataclasses."""
from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from lzn.task import TaskConfig


@dataclass
class RunConfig(TaskConfig):
    output_dir: str = "outputs"
    # One folder per (task, scale, seed) unless named: re-running the same command resumes it.
    run_name: str = "${hydra:runtime.choices.scale}-seed${train.seed}"
    resume: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
