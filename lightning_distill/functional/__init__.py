"""Pure-torch math of trajectory matching (no Lightning): losses, unrolled matching, window,
difficulty scores and PAD's data-selection schedule."""

from .difficulty import (
    PADSchedule,
    PADSelection,
    class_difficulty_order,
    el2n_scores,
    pad_selection,
    pad_subset_bounds,
    pad_subset_sizes,
)
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
    "PADSchedule",
    "PADSelection",
    "class_difficulty_order",
    "classification_loss",
    "el2n_scores",
    "pad_selection",
    "pad_subset_bounds",
    "pad_subset_sizes",
    "parameter_mask",
    "sample_minibatches",
    "sample_start_epoch",
    "soft_cross_entropy",
    "trajectory_matching",
    "trajectory_matching_loss",
    "window_upper_bound",
]
