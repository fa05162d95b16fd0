"""lightning_distill: dataset distillation by trajectory matching for PyTorch Lightning.

MTT (match expert trajectories), FTD (flat GSAM experts, EMA images) and DATM
(difficulty-aligned windows, soft labels) as Lightning modules and callbacks.
"""

from .data import DSA, ZCA, RealDataModule, SyntheticSet
from .models import build_model
from .modules import DistillationModule, EvalModule, ExpertTrajectoryModule
from .trajectories import TrajectoryStore, import_replay_buffers

__version__ = "0.1.0.dev0"

__all__ = [
    "DSA",
    "ZCA",
    "DistillationModule",
    "EvalModule",
    "ExpertTrajectoryModule",
    "RealDataModule",
    "SyntheticSet",
    "TrajectoryStore",
    "build_model",
    "import_replay_buffers",
]
