"""DataSelection: train on an epoch-dependent subset of the training split (PAD's experts).

PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024) trains each expert on
the easiest samples first, adds harder ones until an epoch and drops the easiest ones late
in training (:class:`~lightning_distill.functional.PADSchedule`). This callback applies any
such schedule, given as a pure function ``select(epoch) -> indices`` into the
datamodule's training split (e.g. :class:`~lightning_distill.functional.PADSelection`),
to a ``trainer.fit`` with a :class:`~lightning_distill.data.RealDataModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from ..artifacts import sha256
from ..data.splits import split_labels
from ..errors import InputError, InputTypeError, StateError
from ..protocols import SelectableTrainData

__all__ = ["DataSelection", "PADDataSelection"]


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
        if not isinstance(dm, SelectableTrainData):
            raise InputTypeError(
                "DataSelection needs trainer.fit(..., datamodule=RealDataModule(...)); got "
                f"{type(dm).__name__ if dm is not None else 'no datamodule'}"
            )
        return dm

    def _digest(self, epochs: int) -> str:
        return sha256(*(torch.as_tensor(self.select(e), dtype=torch.long)
                        for e in range(epochs)))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self._datamodule(trainer)
        n = trainer.reload_dataloaders_every_n_epochs
        if n not in (0, 1):
            raise InputError(
                f"DataSelection: Trainer(reload_dataloaders_every_n_epochs={n}) would keep one "
                "epoch's subset for several epochs; leave it at 0 or 1"
            )
        if trainer.world_size > 1:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            mine = self._digest(epochs)
            reference = trainer.strategy.broadcast(mine, src=0)
            if not trainer.strategy.reduce_boolean_decision(reference == mine, all=True):
                raise StateError(
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


class PADDataSelection(DataSelection):
    """PAD's easy-to-hard data selection, written in YAML: the EL2N scores and the
    schedule from settings, no function to pass.

    In ``setup`` (before the first epoch) the callback loads the EL2N scores of the
    datamodule's training split from ``scores_path``, or computes them there first
    (:func:`~lightning_distill.difficulty.load_or_compute_el2n`: ``num_models`` networks
    of the module's architecture, ``score_epochs`` epochs each; rank 0 computes, the
    other ranks wait and load), then trains every epoch on
    :class:`~lightning_distill.functional.PADSelection` of those scores
    (:class:`DataSelection`). A score file of other data or settings is refused. ::

        trainer:
          callbacks:
          - class_path: lightning_distill.callbacks.PADDataSelection
            init_args: {initial_ratio: 0.75, add_end_epoch: 20, scores_path: scores.pt}

    Args:
        initial_ratio, add_end_epoch, remove_epochs, remove_ratios: the schedule
            (:class:`~lightning_distill.functional.PADSchedule`; PAD's CIFAR-10 values).
        num_models, score_epochs, score_lr, score_seed: the scoring networks
            (:func:`~lightning_distill.difficulty.el2n_settings`).
        scores_path: the score file; None: ``difficulty_el2n.pt`` in the store of the
            fit's TrajectoryRecorder.
    """

    def __init__(self, initial_ratio: float = 0.75, add_end_epoch: int = 20,
                 remove_epochs: Sequence[int] = (40, 60),
                 remove_ratios: Sequence[float] = (0.1, 0.2), num_models: int = 10,
                 score_epochs: int = 10, score_lr: float = 0.01, score_seed: int = 0,
                 scores_path: str | None = None) -> None:
        from ..functional.difficulty import PADSchedule

        # the values are checked now, before any fit
        self.schedule = PADSchedule(initial_ratio=float(initial_ratio),
                                    add_end_epoch=int(add_end_epoch),
                                    remove_epochs=tuple(int(e) for e in remove_epochs),
                                    remove_ratios=tuple(float(r) for r in remove_ratios))
        if int(num_models) < 1 or int(score_epochs) < 1 or not float(score_lr) > 0:
            raise InputError(
                "PADDataSelection: num_models and score_epochs must be >= 1 and score_lr > 0; "
                f"got {num_models}, {score_epochs}, {score_lr}")
        self.num_models, self.score_epochs = int(num_models), int(score_epochs)
        self.score_lr, self.score_seed = float(score_lr), int(score_seed)
        self.scores_path = scores_path
        self.scores: Any = None
        self._prepared_for: Any = None
        super().__init__(self._unprepared)

    def store_record(self) -> dict[str, Any]:
        """What a trajectory store records of this selection (``hparams["data_selection"]``,
        docs/formats.md): the callback's arguments."""
        s = self.schedule
        return {"data_selection": {
            "score": "el2n", "num_models": self.num_models, "score_epochs": self.score_epochs,
            "score_lr": self.score_lr, "score_seed": self.score_seed,
            "scores_path": self.scores_path, "initial_ratio": s.initial_ratio,
            "add_end_epoch": s.add_end_epoch, "remove_epochs": list(s.remove_epochs),
            "remove_ratios": list(s.remove_ratios)}}

    @staticmethod
    def _unprepared(epoch: int) -> Tensor:
        raise StateError("PADDataSelection: no scores yet (setup() prepares them)")

    def settings(self, model: dict[str, Any], batch_size: int) -> dict[str, Any]:
        """The EL2N settings for ``model`` (build_model keywords) and ``batch_size``."""
        from ..difficulty import el2n_settings

        return el2n_settings(model, num_models=self.num_models, epochs=self.score_epochs,
                             lr=self.score_lr, batch_size=batch_size, seed=self.score_seed)

    def prepare(self, dm: Any, model: dict[str, Any], path: str | Path,
                device: torch.device | str = "cpu", compute: bool = True,
                log: Callable[[str], None] | None = None) -> None:
        """Load (or, with ``compute``, compute and save) the scores of ``dm``'s training
        split at ``path`` and build the epoch -> subset function from them."""
        from ..difficulty import DifficultyScoresError, load_or_compute_el2n
        from ..functional.difficulty import PADSelection

        path = Path(path)
        if not compute and not path.is_file():
            raise DifficultyScoresError(f"PADDataSelection: {path} is missing (rank 0 should "
                                        "have written it)")
        settings = self.settings(model, int(dm.batch_size))
        self.scores = load_or_compute_el2n(path, dm, settings, device=device, log=log)
        labels = split_labels(dm.train_set)
        self.select = PADSelection(self.scores.scores, labels, self.schedule, dm.num_classes)
        self._prepared_for = dm

    def _path(self, trainer: pl.Trainer) -> Path:
        from ..difficulty import DIFFICULTY_FILE

        if self.scores_path is not None:
            return Path(self.scores_path)
        from .trajectory import TrajectoryRecorder

        for cb in trainer.callbacks:
            if isinstance(cb, TrajectoryRecorder):
                return cb.store_path / DIFFICULTY_FILE
        raise InputError("PADDataSelection: set scores_path (the EL2N score file), or fit "
                         "with a TrajectoryRecorder (the file then goes into its store)")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._prepared_for is not self._datamodule(trainer):
            dm = self._datamodule(trainer)
            net = getattr(pl_module, "net", None)
            model = getattr(net, "model_config", None)
            if model is None:
                raise InputTypeError(
                    f"PADDataSelection: {type(pl_module).__name__} has no net.model_config "
                    "(the architecture the scoring networks use); train an "
                    "ExpertTrajectoryModule")
            path = self._path(trainer)
            if trainer.world_size > 1 and not path.is_file():
                if trainer.is_global_zero:  # one process computes, the others wait
                    self.prepare(dm, dict(model), path, trainer.strategy.root_device)
                trainer.strategy.barrier("pad_scores")
            if self._prepared_for is not dm:
                self.prepare(dm, dict(model), path, trainer.strategy.root_device,
                             compute=trainer.world_size == 1)
        super().setup(trainer, pl_module, stage)
