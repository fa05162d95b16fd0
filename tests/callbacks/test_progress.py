"""StageProgressBar: the stage row advances by units / max_epochs at each epoch end, from
the work done before the fit to done + units at its end; make_callbacks keeps exactly one
progress bar, or none when bars are off."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, RichProgressBar
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks import StageProgressBar
from lightning_distill.callbacks.progress import PhaseProgress
from lightning_distill.stages._common import make_callbacks


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.w(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


class Record(Callback):
    def __init__(self, bar):
        self.bar, self.seen = bar, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(self.bar.stage_completed)


def test_the_stage_row_goes_from_done_to_done_plus_units():
    bar = StageProgressBar("experts", total=4, done=1, units=2)
    record = Record(bar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_model_summary=False, callbacks=[bar, record]).fit(Tiny())
    assert record.seen == pytest.approx([1 + 2 / 3, 1 + 4 / 3, 3.0])
    task = bar.progress.tasks[bar.stage_task]
    assert (task.total, task.completed) == (4.0, 3.0) and "experts" in task.description


def test_bad_positions_are_refused():
    with pytest.raises(ValueError, match="0 <= done <= total"):
        StageProgressBar("experts", total=2, done=3)


def test_make_callbacks_keeps_one_bar_or_none():
    other = Callback()
    bar = StageProgressBar("experts", total=2)
    on, off = True, False
    assert make_callbacks(on, [other, bar]) == [other, bar]
    plain = make_callbacks(on, [other])
    assert plain[0] is other and isinstance(plain[1], RichProgressBar) and len(plain) == 2
    assert make_callbacks(off, [other, bar]) == [other]


class Phase(Callback):
    """Runs a PhaseProgress of 4 units at the end of the first epoch and records it."""

    def __init__(self, every_s=10.0):
        self.every_s, self.lines, self.rows = every_s, [], []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch:
            return
        with PhaseProgress(trainer, "validation runs", total=4, report=self.lines.append,
                           every_s=self.every_s) as phase:
            for _ in range(8):
                phase.advance(0.5)
                if phase.task is not None:
                    task = phase.progress.tasks[-1]
                    self.rows.append((task.description, task.completed))
        self.after = None if phase.progress is None else len(phase.progress.tasks)


def _fit(bar, phase):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_model_summary=False, enable_progress_bar=bar is not None,
                   callbacks=[*([bar] if bar else []), phase]).fit(Tiny())


def test_a_phase_is_a_row_of_the_rich_bar_while_it_runs():
    bar, phase = RichProgressBar(), Phase()
    _fit(bar, phase)
    assert [c for _, c in phase.rows] == [0.5 * k for k in range(1, 9)]
    assert all("validation runs" in d for d, _ in phase.rows)
    # the row is gone after the phase: the Trainer's own rows remain
    assert phase.after is not None and all("validation" not in t.description
                                           for t in bar.progress.tasks)
    assert phase.lines == []  # the bar shows it: no lines printed


def test_without_a_rich_bar_a_phase_reports_lines_throttled():
    quiet = Phase(every_s=3600)  # shorter than the interval: silent
    _fit(None, quiet)
    assert quiet.rows == [] and quiet.lines == []
    chatty = Phase(every_s=0)
    _fit(None, chatty)
    assert chatty.lines[0].startswith("validation runs: 0.5/4") and len(chatty.lines) == 8
    assert chatty.lines[-1].startswith("validation runs: 4.0/4")
