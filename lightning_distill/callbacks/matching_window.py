"""MatchingWindow: the difficulty-aligned start-epoch window (DATM).

Guo et al., ICLR 2024; docs/method.md, section 'Matching window'.

The start epoch t of each outer iteration is uniform on {T-, ..., UB-1}. With
sequential generation, UB = min(T+, T + floor((T+ - T) * it / expansion_end)): early
iterations match easy (early) trajectory segments, later ones raise the bound towards
T+. Without it UB = T+ (MTT is T- = 0 without sequential generation).

Example::

    window = MatchingWindow(min_start_epoch=0, current_max_start_epoch=10,
                            max_start_epoch=20, expansion_end=1000, sequential=True)
    trainer = pl.Trainer(callbacks=[window])
    trainer.fit(DistillationModule(...))
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ..errors import InputError
from ..functional.matching import sample_start_epoch, window_upper_bound


class MatchingWindow(Callback):
    """Start-epoch window (T-, T, T+, expansion_end, sequential generation on/off).

    Attach it to a Trainer with a :class:`~lightning_distill.DistillationModule`; the
    module samples its start epochs from the window of the callback (or from its
    own default window, T- = 0 and UB = max_start_epoch, without the callback).
    The state (configuration, last iteration and upper bound) goes into checkpoints, and
    a resumed run with a different window is refused.
    """

    def __init__(
        self,
        min_start_epoch: int = 0,
        current_max_start_epoch: int | None = None,
        max_start_epoch: int = 20,
        expansion_end: int | None = None,
        sequential: bool = False,
    ) -> None:
        if sequential and (current_max_start_epoch is None or expansion_end is None):
            raise InputError("MatchingWindow: sequential generation needs "
                             "current_max_start_epoch and expansion_end")
        self.min_start_epoch = int(min_start_epoch)
        self.max_start_epoch = int(max_start_epoch)
        self.current_max_start_epoch = (
            int(current_max_start_epoch) if current_max_start_epoch is not None
            else self.max_start_epoch
        )
        self.expansion_end = int(expansion_end) if expansion_end is not None else 1
        self.sequential = bool(sequential)
        self.last_iteration = -1
        self.last_upper_bound = self.upper_bound(0)

    # -- the rule ------------------------------------------------------------------
    def _args(self) -> tuple[int, int, int, int, bool]:
        return (self.min_start_epoch, self.current_max_start_epoch, self.max_start_epoch,
                self.expansion_end, self.sequential)

    def upper_bound(self, iteration: int) -> int:
        """Exclusive upper bound UB at ``iteration``."""
        return window_upper_bound(iteration, *self._args())

    def sample(self, iteration: int, generator: torch.Generator | None = None) -> int:
        """A start epoch uniform on {T-, ..., UB(iteration) - 1}."""
        self.last_iteration = int(iteration)
        self.last_upper_bound = self.upper_bound(iteration)
        return sample_start_epoch(iteration, *self._args(), generator=generator)

    @property
    def max_reachable_start(self) -> int:
        """The largest start epoch any iteration can draw (T+ - 1)."""
        return self.max_start_epoch - 1

    # -- Lightning ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.matching_window = self

    def _config(self) -> dict[str, Any]:
        return {"min_start_epoch": self.min_start_epoch,
                "current_max_start_epoch": self.current_max_start_epoch,
                "max_start_epoch": self.max_start_epoch,
                "expansion_end": self.expansion_end, "sequential": self.sequential}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "last_iteration": self.last_iteration,
                "last_upper_bound": self.last_upper_bound}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict[k] for k in self._config() if k in state_dict}
        if saved != self._config():
            raise InputError(
                f"MatchingWindow: the checkpoint was written with window {saved}, but this "
                f"run configures {self._config()}; resume with the same window or start a "
                "new run")
        self.last_iteration = int(state_dict.get("last_iteration", -1))
        self.last_upper_bound = int(state_dict.get("last_upper_bound", self.last_upper_bound))
