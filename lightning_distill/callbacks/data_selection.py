"""DataSelection: train on an epoch-dependent subset of the training split (PAD's experts).

PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024) trains each expert on
the easiest samples first, adds harder ones until an epoch and drops the easiest ones late
in training (:class:`~lightning_distill.functional.PADSchedule`). This callback applies any
such schedule, given as a pure function ``select(epoch) -> indices`` into the
datamodule's training split (e.g. :class:`~lightning_distill.functional.PADSelection`),
to a ``trainer.fit`` with a :class:`~lightning_distill.data.RealDataModule`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

__all__ = ["DataSelection"]


class DataSelection(Callback):
    """At epoch ``e`` the model trains on ``select(e)`` only (indices into ``train_set``).

    How: in ``setup`` the callback installs ``select`` as the datamodule's
    ``train_selection`` and sets ``trainer.reload_dataloaders_every_n_epochs = 1``, so the
    Trainer asks :meth:`RealDataModule.train_dataloader` for a new loader at every epoch
    start, and that loader serves the subset of ``trainer.current_epoch`` (its order a
    pure function of the epoch too). Lightning then also re-derives the number of batches
    per epoch, so validation, progress bar and logging follow the changing size. In
    ``teardown`` the datamodule and the Trainer get their previous values back, so the
    same datamodule can serve a later ``fit`` without selection.

    - Resume: the subset depends only on the epoch, so a run resumed from a checkpoint
      (``fit(ckpt_path=...)``) trains epoch ``e`` on the same subset, in the same order,
      as an uninterrupted run; the callback holds no state.
    - DDP: every rank computes the same subset; the ``batched`` loader shards it like the
      full set (:func:`~lightning_distill.data.datamodule.shard_indices`), the
      ``dataloader`` loader through Lightning's DistributedSampler. In ``setup`` the
      ranks compare a digest of their subsets for all ``max_epochs`` epochs and fail
      together if any differs (e.g. different score files).

    Logged: ``data/selected``, the size of the epoch's subset (before sharding).

    Args:
        select: ``epoch -> int64 indices`` into ``datamodule.train_set``; must depend on
            the epoch alone.
    """

    def __init__(self, select: Callable[[int], Tensor]) -> None:
        super().__init__()
        self.select = select
        self._previous: tuple[Any, Any, int] | None = None

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_selection"):
            raise TypeError(
                "DataSelection needs trainer.fit(..., datamodule=RealDataModule(...)); got "
                f"{type(dm).__name__ if dm is not None else 'no datamodule'}"
            )
        return dm

    def _digest(self, epochs: int) -> str:
        h = hashlib.sha256()
        for e in range(epochs):
            idx = torch.as_tensor(self.select(e), dtype=torch.long).contiguous().cpu()
            h.update(idx.numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self._datamodule(trainer)
        n = trainer.reload_dataloaders_every_n_epochs
        if n not in (0, 1):
            raise ValueError(
                f"DataSelection: Trainer(reload_dataloaders_every_n_epochs={n}) would keep one "
                "epoch's subset for several epochs; leave it at 0 or 1"
            )
        if trainer.world_size > 1:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            mine = self._digest(epochs)
            reference = trainer.strategy.broadcast(mine, src=0)
            if not trainer.strategy.reduce_boolean_decision(reference == mine, all=True):
                raise RuntimeError(
                    f"DataSelection: the {trainer.world_size} ranks select different training "
                    f"subsets (rank {trainer.global_rank} differs from rank 0); every rank must "
                    "load the same difficulty scores"
                )
        self._previous = (dm, dm.train_selection, n)
        dm.train_selection = self.select
        trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self._datamodule(trainer)
        size = int(dm.selected_indices(trainer.current_epoch).numel())
        # the same on every rank; sync_dist only keeps Lightning from warning under DDP
        pl_module.log("data/selected", float(size), on_step=False, on_epoch=True, sync_dist=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._previous is None:
            return
        dm, selection, n = self._previous
        dm.train_selection = selection
        trainer.reload_dataloaders_every_n_epochs = n
        self._previous = None
