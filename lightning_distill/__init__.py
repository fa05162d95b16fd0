"""lightning_distill: dataset distillation by trajectory matching for PyTorch Lightning.

MTT (match expert trajectories), FTD (flat GSAM experts, EMA images) and DATM
(difficulty-aligned windows, soft labels) as Lightning modules and callbacks.
"""

from ._version import __version__
from .data import DSA, ZCA, RealDataModule, SyntheticDataModule, SyntheticSet
from .errors import LightningDistillError
from .models import build_model
from .modules import DistillationModule, EvalModule, ExpertTrajectoryModule
from .replay_buffers import import_replay_buffers
from .trajectories import TrajectoryStore

__all__ = [
    "DSA",
    "ZCA",
    "__version__",
    "DistillationModule",
    "EvalModule",
    "ExpertTrajectoryModule",
    "LightningDistillError",
    "RealDataModule",
    "SyntheticDataModule",
    "SyntheticSet",
    "TrajectoryStore",
    "build_model",
    "import_replay_buffers",
]
