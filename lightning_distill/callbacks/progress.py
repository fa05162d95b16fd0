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

import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

from ..errors import InputError

__all__ = ["IterationProgressBar", "PhaseProgress", "StageProgressBar"]


def _count(total: float) -> float:
    """A whole total as an int, so a row reads "3/8", not "3/8.0"."""
    return int(total) if float(total).is_integer() else total


class PhaseProgress:
    """Progress of a long phase inside a fit (PeriodicEvaluation's validation runs), so
    it is not a silent pause of the Trainer's bar.

    Under a :class:`~pytorch_lightning.callbacks.RichProgressBar` the phase is an extra
    row of that bar (``label  done/total``, removed when the phase ends); under any other
    bar, or none, ``report`` gets a line at most every ``every_s`` seconds (and never for
    a phase shorter than that). Use as a context manager and call :meth:`advance`::

        with PhaseProgress(trainer, "validation runs", total=5, report=module.print) as p:
            protocol.train_runs(..., on_progress=p.advance)
    """

    def __init__(self, trainer: pl.Trainer | None, label: str, total: float,
                 report: Callable[[str], None] = print, every_s: float = 10.0) -> None:
        bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
        self.progress = bar.progress if isinstance(bar, RichProgressBar) else None
        self.bar = bar
        self.label, self.total, self.report, self.every_s = label, float(total), report, every_s
        self.completed = 0.0
        self.task: Any = None
        self._last = self._start = 0.0

    def __enter__(self) -> PhaseProgress:
        self._last = self._start = time.monotonic()
        if self.progress is not None:
            self.task = self.progress.add_task(f"[bold]{self.label}", total=_count(self.total))
        return self

    def advance(self, amount: float) -> None:
        """``amount`` more of the phase's units done."""
        self.completed = min(self.total, self.completed + float(amount))
        now = time.monotonic()
        if self.task is not None:
            self.progress.update(self.task, completed=self.completed)
            if now - self._last >= 0.5:  # the rich bar redraws on refresh only
                self.bar.refresh()
                self._last = now
        elif now - self._last >= self.every_s:
            self.report(f"{self.label}: {self.completed:.1f}/{self.total:g} "
                        f"({now - self._start:.0f} s)")
            self._last = now

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


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
            raise InputError(f"StageProgressBar: need total > 0 and 0 <= done <= total, got "
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
                f"[bold]{self.label}", total=_count(self.total), completed=self.done)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.progress is not None and self.stage_task is not None:
            epochs = max(1, int(trainer.max_epochs or 1))
            fraction = min(1.0, (trainer.current_epoch + 1) / epochs)
            self.progress.update(self.stage_task, completed=self.done + self.units * fraction)
            self.refresh()


class IterationProgressBar(RichProgressBar):
    """A RichProgressBar whose training row counts a distillation's outer iterations:
    ``iterations  k/N`` instead of ``Epoch 0/-2`` (a DistillationModule's fit is one
    epoch of its N iterations, under ``max_epochs=-1`` since the module stops itself).
    The ``distill`` subcommand adds one; add it to your own Trainer's callbacks too.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description="iterations")
            self.refresh()
