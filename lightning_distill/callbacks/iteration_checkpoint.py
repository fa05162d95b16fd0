"""IterationCheckpoint: a resumable ``last.ckpt`` of a distillation run, saved atomically.

Distillation is one long epoch of outer iterations, so Lightning's epoch-based
``ModelCheckpoint`` is not the resume point (it can still be added to keep the best
iterations by a monitored metric such as ``distill/loss``); this ``Checkpoint`` saves
the full training state (module, optimizers, callbacks' state, the per-rank
generators) every ``every_n`` iterations and at the end (docs/formats.md, section
'Distillation checkpoint').

Example::

    trainer = pl.Trainer(callbacks=[IterationCheckpoint("runs/ipc10/checkpoints", every_n=100)])
    trainer.fit(distillation_module)             # rerun with ckpt_path=".../last.ckpt" to resume
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint

from ..errors import StateError

__all__ = ["IterationCheckpoint"]


class IterationCheckpoint(Checkpoint):
    """Save ``dirpath/last.ckpt`` every ``every_n`` outer iterations and at the end.

    The file is written under a temporary name and renamed, so a crash never leaves a
    truncated ``last.ckpt``. Every rank takes part (``Trainer.save_checkpoint`` gathers
    the state of all ranks); global rank 0 renames. ``every_n <= 0`` saves only at the end.

    Args:
        dirpath: directory of ``last.ckpt`` (created by global rank 0); None:
            ``<trainer.default_root_dir>/checkpoints``.
        every_n: save after every ``every_n``-th iteration (``pl_module.iteration``).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n: int = 100) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n = int(every_n)

    def resolve(self, trainer: pl.Trainer) -> Path:
        """``last.ckpt``'s path, ``dirpath`` filled from the trainer when it is None."""
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return self.last

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.resolve(trainer)

    @property
    def last(self) -> Path:
        if self.dirpath is None:
            raise StateError("IterationCheckpoint: no dirpath yet (it is filled from "
                             "trainer.default_root_dir in setup; call resolve(trainer))")
        return self.dirpath / "last.ckpt"

    def save(self, trainer: pl.Trainer) -> None:
        last = self.resolve(trainer)
        tmp = last.parent / ".last.ckpt.tmp"
        if trainer.is_global_zero:
            last.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("iteration_checkpoint")
        trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizers, callbacks
        if trainer.is_global_zero:
            os.replace(tmp, last)
        trainer.strategy.barrier("iteration_checkpoint_done")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n > 0 and int(pl_module.iteration) % self.every_n == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
