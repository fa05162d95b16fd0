"""Helpers shared by the stages: console output and the progress bar."""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback, RichProgressBar
from rich.console import Console

from ..config import TrainerConfig

console = Console()


def make_callbacks(trainer_cfg: TrainerConfig, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` plus a rich progress bar when progress bars are enabled."""
    if trainer_cfg.enable_progress_bar:
        return [*callbacks, RichProgressBar(leave=False)]
    return list(callbacks)
