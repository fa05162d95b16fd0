"""LightningModules: experts, distillation, evaluation."""

from .distill import DistillationModule
from .evaluate import EvalModule, evaluate_synthetic
from .expert import ExpertTrajectoryModule

__all__ = ["DistillationModule", "EvalModule", "ExpertTrajectoryModule", "evaluate_synthetic"]
