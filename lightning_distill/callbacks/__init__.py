"""Lightning callbacks, one a file (Lightning's own convention)."""

from .data_selection import DataSelection, PADDataSelection
from .ema import SyntheticEMA
from .evaluation import PeriodicEvaluation
from .gradient_clip import AdaptiveGradientClip
from .images import SyntheticImageLogger
from .iteration_checkpoint import IterationCheckpoint
from .matching_window import MatchingWindow
from .memory import ReuseFreedMemory
from .progress import IterationProgressBar, StageProgressBar
from .sharpness import ASAM, GSAM, SAM, SharpnessAware
from .trajectory import GroupTrajectoryRecorder, TrajectoryRecorder

__all__ = [
    "ASAM",
    "AdaptiveGradientClip",
    "GSAM",
    "IterationCheckpoint",
    "GroupTrajectoryRecorder",
    "SAM",
    "DataSelection",
    "PADDataSelection",
    "MatchingWindow",
    "PeriodicEvaluation",
    "ReuseFreedMemory",
    "SharpnessAware",
    "IterationProgressBar",
    "StageProgressBar",
    "SyntheticEMA",
    "SyntheticImageLogger",
    "TrajectoryRecorder",
]
