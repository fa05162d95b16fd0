"""LightningModules: experts, distillation, evaluation."""

from .distill import DistillationModule
from .evaluate import EvalModule, evaluate_synthetic
from .expert import ExpertTrajectoryModule, GroupExpertModule

__all__ = [
    "DistillationModule",
    "EvalModule",
    "ExpertTrajectoryModule",
    "GroupExpertModule",
    "evaluate_synthetic",
]
