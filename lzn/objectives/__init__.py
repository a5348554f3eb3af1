"""Objectives: each an nn.Module whose children are parameter groups, with
`loss(batch) -> (loss, metrics)`. One trainer runs them all.

batch keys: "images" (B, C, H, W) in [-1, 1], "labels" (B,), "views" (2, B, C, H, W) for
the two-view objectives, and "rng" (`lzn.data.stream.StepRandom`) for noise and times.
"""
from lzn.objectives.base import AlignConfig, LatentConfig, rectified_flow_loss
from lzn.objectives.generation import GenerationObjective
from lzn.objectives.joint import JointObjective
from lzn.objectives.representation import RepresentationObjective
from lzn.objectives.simclr import SimCLRObjective

__all__ = [
    "AlignConfig", "LatentConfig", "rectified_flow_loss", "GenerationObjective",
    "JointObjective", "RepresentationObjective", "SimCLRObjective",
]
