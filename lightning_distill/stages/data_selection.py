"""The experts stage's ``data_selection`` section: PAD's easy-to-hard training of the experts.

PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024) scores every training
sample by EL2N averaged over a few briefly trained networks (:mod:`lightning_distill.difficulty`)
and trains each expert on a per-class, epoch-dependent subset, easiest first
(:class:`~lightning_distill.functional.PADSchedule`, applied by
:class:`~lightning_distill.callbacks.DataSelection`). Off by default: without
``data_selection.enabled: true`` the experts stage is unchanged.

YAML (the PAD CIFAR-10 values; AEE 40 for CIFAR-100 and Tiny ImageNet)::

    data_selection:
      enabled: true
      score: el2n
      num_models: 10        # scoring networks, averaged
      score_epochs: 10      # epochs each scoring network trains
      initial_ratio: 0.75   # IR
      add_end_epoch: 20     # AEE
      remove_epochs: [40, 60]
      remove_ratios: [0.1, 0.2]
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..callbacks.data_selection import PADDataSelection
from ..config import TrainerConfig
from ..functional.difficulty import PADSchedule
from ._common import say

__all__ = [
    "DataSelectionConfig",
    "check_data_selection",
    "data_selection_callback",
    "data_selection_hparams",
    "pad_callback",
    "pad_schedule",
    "score_device",
]

_SCORES = ("el2n",)


@dataclass
class DataSelectionConfig:
    """PAD data selection for the experts (``data_selection:`` in ``experts.yaml``).

    Attributes:
        enabled: train the experts on the easy-to-hard schedule (default off).
        score: the difficulty score; ``"el2n"``.
        num_models: networks whose EL2N scores are averaged.
        score_epochs: epochs each scoring network trains on the whole training split
            (SGD momentum 0.9, weight decay 5e-4, constant ``score_lr``, the experts' batch
            size and architecture, no augmentation).
        score_lr: learning rate of the scoring networks.
        score_seed: seeds the scoring networks (network k: ``derive_seed(score_seed, k)``).
        cache: the score file (default ``<store>/difficulty_el2n.pt``); computed once,
            loaded by later runs and shards, refused if it belongs to other data/settings.
        initial_ratio: IR, fraction of each class (easiest first) at epoch 0.
        add_end_epoch: AEE, first epoch on the whole class.
        remove_epochs: (rm1, rm2): after epoch rm1 the easiest r1 of each class is
            dropped, after rm2 the easiest r2.
        remove_ratios: (r1, r2).
    """

    enabled: bool = False
    score: str = "el2n"
    num_models: int = 10
    score_epochs: int = 10
    score_lr: float = 0.01
    score_seed: int = 0
    cache: str | None = None
    initial_ratio: float = 0.75
    add_end_epoch: int = 20
    remove_epochs: list[int] = field(default_factory=lambda: [40, 60])
    remove_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2])


def pad_schedule(cfg: DataSelectionConfig) -> PADSchedule:
    """The :class:`PADSchedule` of ``cfg`` (validates the values)."""
    return pad_callback(cfg).schedule


def check_data_selection(cfg: DataSelectionConfig) -> None:
    """Fail before any work on a bad ``data_selection`` section (nothing checked when off)."""
    if not cfg.enabled:
        return
    if cfg.score not in _SCORES:
        raise ValueError(f"data_selection.score must be one of {_SCORES}; got {cfg.score!r}")
    try:
        pad_callback(cfg)  # the callback checks the schedule and the scoring settings
    except ValueError as e:
        raise ValueError(f"data_selection: {e}") from e


def pad_callback(cfg: DataSelectionConfig) -> PADDataSelection:
    """The :class:`PADDataSelection` of the section's values (not prepared yet)."""
    return PADDataSelection(
        initial_ratio=cfg.initial_ratio, add_end_epoch=cfg.add_end_epoch,
        remove_epochs=cfg.remove_epochs, remove_ratios=cfg.remove_ratios,
        num_models=cfg.num_models, score_epochs=cfg.score_epochs, score_lr=cfg.score_lr,
        score_seed=cfg.score_seed)


def data_selection_hparams(cfg: DataSelectionConfig) -> dict[str, Any]:
    """What the store's meta records: ``{"data_selection": {...}}`` when on, ``{}`` when off
    (so a store trained without selection has exactly the meta it had before)."""
    return {"data_selection": asdict(cfg)} if cfg.enabled else {}


def score_device(trainer: TrainerConfig) -> torch.device:
    """Where the scoring networks train: the experts' accelerator, first (or this local
    rank's) device."""
    acc = str(trainer.accelerator).lower()
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "mps":
        return torch.device("mps")
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if isinstance(trainer.devices, (list, tuple)) and trainer.devices:
            return torch.device("cuda", int(trainer.devices[0]))
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def data_selection_callback(
    cfg: DataSelectionConfig,
    dm: Any,
    *,
    store: Any,
    model: dict[str, Any],
    trainer: TrainerConfig,
    batch_size: int,
) -> PADDataSelection | None:
    """The experts' :class:`DataSelection` callback for ``cfg`` (None when off).

    Loads the EL2N scores of ``dm``'s training split from ``cfg.cache`` (default
    ``<store>/difficulty_el2n.pt``), computing and saving them first when the file is
    absent; a file for other data or settings is refused. One callback serves every
    expert (it holds no state).
    """
    if not cfg.enabled:
        return None
    from ..difficulty import DIFFICULTY_FILE

    check_data_selection(cfg)
    callback = pad_callback(cfg)
    path = Path(cfg.cache) if cfg.cache else Path(store.path) / DIFFICULTY_FILE
    if not path.is_file():
        say(f"Data selection (PAD): scoring the {len(dm.train_set)} training images with EL2N "
             f"over {cfg.num_models} networks x {cfg.score_epochs} epochs into {path}")
    # scored once here, before the first expert: the callback then has them for every fit
    callback.prepare(dm, model, path, device=score_device(trainer), log=say)
    scores, select = callback.scores, callback.select
    _, labels = dm.train_set.tensors
    s = select.schedule
    say(f"Data selection (PAD): EL2N scores {'computed' if scores.computed else 'loaded'} "
         f"({path}, digest {scores.digest}); epoch 0 trains on {int(select.sizes(0).sum())} of "
         f"{len(labels)} images, all from epoch {s.add_end_epoch}, without the easiest "
         f"{s.remove_ratios[0]:g} after epoch {s.remove_epochs[0]} and the easiest "
         f"{s.remove_ratios[1]:g} after epoch {s.remove_epochs[1]}")
    return callback
