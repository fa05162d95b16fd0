"""Pure-torch math of trajectory matching (no Lightning): losses, unrolled matching, window."""

from .losses import classification_loss, soft_cross_entropy
from .matching import (
    MATCH_RULES,
    MATCHING_MODES,
    MatchResult,
    parameter_mask,
    sample_minibatches,
    sample_start_epoch,
    trajectory_matching,
    trajectory_matching_loss,
    window_upper_bound,
)

__all__ = [
    "MATCHING_MODES",
    "MATCH_RULES",
    "MatchResult",
    "classification_loss",
    "parameter_mask",
    "sample_minibatches",
    "sample_start_epoch",
    "soft_cross_entropy",
    "trajectory_matching",
    "trajectory_matching_loss",
    "window_upper_bound",
]
