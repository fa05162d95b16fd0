"""Helpers shared by the stages: console output and the progress bar."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console

console = Console()


def say(message: str, rule: bool = False) -> None:
    """Print a stage message on rank 0 (a rule: a heading line)."""
    if rank_zero_only.rank == 0:
        (console.rule if rule else console.print)(message)


def make_callbacks(progress_bar: bool, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` with one rich progress bar when progress bars are enabled (the one
    among ``callbacks``, a StageProgressBar say, else a RichProgressBar) and none when
    they are off (Lightning refuses a progress bar callback then)."""
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    others = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not progress_bar:
        return others
    return [*others, bars[0] if bars else RichProgressBar(leave=False)]


def prepare(datamodule: Any, stage: str) -> None:
    """``prepare_data()`` on global rank 0 (a download, a cache), then ``setup(stage)``:
    the datamodule ready before a stage reads it outside ``Trainer.fit``. Under DDP
    started by Lightning the other ranks start inside ``fit``, after this ran on rank 0."""
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()
    datamodule.setup(stage)


class _OnceFilter(logging.Filter):
    """Pass each distinct INFO line once per process (a stage that starts one Trainer
    per expert would repeat Lightning's banner lines); warnings and errors always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        fresh = message not in self.seen
        self.seen.add(message)
        return fresh


def quiet_lightning() -> None:
    """What the command line shows of Lightning's messages: each INFO line once
    (:class:`_OnceFilter`), and not the deprecation warning of Lightning 2.6's own use of
    a ``torch.utils._pytree`` name (nothing a user can act on)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for logger in ("pytorch_lightning", "lightning_fabric"):
        for handler in logging.getLogger(logger).handlers:
            if not any(isinstance(f, _OnceFilter) for f in handler.filters):
                handler.addFilter(_OnceFilter())


#: a distillation directory of one seed, ``<name>_s<seed>``: what ``run`` names each
#: entry of a ``seeds: [...]`` distillation, and what ``evaluate`` groups by
SEED_DIR = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")


def seed_dir_name(name: str, seed: int) -> str:
    """The directory name of ``name`` distilled from ``seed`` (matches :data:`SEED_DIR`)."""
    return f"{name}_s{seed}"
