"""StageProgressBar: Lightning's rich progress bar plus one row for a whole stage.

A stage that runs several fits (the experts stage: one Trainer per expert or group)
gives each Trainer a StageProgressBar that knows the stage's position: the extra row
reads ``experts  3.5/8`` with the elapsed time and rich's estimate of the time left,
and advances at the end of every epoch (by ``units / max_epochs``), so a long stage is
never silent between its per-fit bars.

Example::

    bar = StageProgressBar("experts", total=8, done=3, units=1)
    pl.Trainer(max_epochs=50, callbacks=[bar]).fit(expert)   # the row goes 3 -> 4
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

__all__ = ["StageProgressBar"]


class StageProgressBar(RichProgressBar):
    """A RichProgressBar with a stage row: ``label  done/total``.

    Args:
        label: the row's description ("experts").
        total: the stage's units of work (experts to train).
        done: units finished before this fit.
        units: units this fit completes (a group of K experts: K).
        leave, **kwargs: RichProgressBar's.
    """

    def __init__(self, label: str, total: float, done: float = 0.0, units: float = 1.0,
                 leave: bool = False, **kwargs: Any) -> None:
        super().__init__(leave=leave, **kwargs)
        if total <= 0 or not 0 <= done <= total or units < 0:
            raise ValueError(f"StageProgressBar: need total > 0 and 0 <= done <= total, got "
                             f"total={total}, done={done}, units={units}")
        self.label, self.total, self.done, self.units = str(label), float(total), float(done), \
            float(units)
        self.stage_task: Any = None

    @property
    def stage_completed(self) -> float | None:
        """The stage row's position (None before the row exists)."""
        if self.progress is None or self.stage_task is None:
            return None
        return float(self.progress.tasks[self.stage_task].completed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.progress is not None and self.stage_task is None:
            self.stage_task = self.progress.add_task(
                f"[bold]{self.label}", total=self.total, completed=self.done)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.progress is not None and self.stage_task is not None:
            epochs = max(1, int(trainer.max_epochs or 1))
            fraction = min(1.0, (trainer.current_epoch + 1) / epochs)
            self.progress.update(self.stage_task, completed=self.done + self.units * fraction)
            self.refresh()
