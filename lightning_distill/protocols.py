"""The agreements between the library's modules, datamodules and callbacks that are not
constructor arguments, in one place (docs/design.md, 'Agreements between objects').

Each is a :class:`typing.Protocol` (``runtime_checkable``, so the code that relies on
one asks ``isinstance(obj, Protocol)`` and a user's own class takes part by having the
members, no base class needed). Everything else a piece needs is a constructor argument
(a callback's settings, a module's hyperparameters), which a LightningCLI config carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "DefersTrainLoader",
    "LossClosure",
    "OwnsTrainLoader",
    "SelectableTrainData",
    "StoreRecord",
    "SyntheticTrainLoader",
    "TrajectorySource",
]


@runtime_checkable
class OwnsTrainLoader(Protocol):
    """A module whose training batches are its own, whatever datamodule is attached
    (DistillationModule: its outer iterations). The datamodule's real data stay for the
    module's initialisation and for the callbacks' validation split."""

    owns_train_loader: bool

    def train_dataloader(self) -> Any: ...


@runtime_checkable
class DefersTrainLoader(Protocol):
    """A datamodule that serves an :class:`OwnsTrainLoader` module's own
    ``train_dataloader()`` instead of its training split (RealDataModule). A module that
    owns its loader refuses a datamodule without this, whose batches would replace it."""

    defers_train_loader: bool


@runtime_checkable
class LossClosure(Protocol):
    """A module that SAM / ASAM / GSAM can train: in ``training_step`` it sets
    ``loss_closure`` to a zero-argument callable recomputing the step's loss on the same
    (augmented) batch; the callback calls it once at the perturbed weights in
    ``on_before_optimizer_step`` and resets it to None."""

    loss_closure: Callable[[], Tensor] | None


@runtime_checkable
class StoreRecord(Protocol):
    """A callback that changes what the experts train on and says so in the trajectory
    store's ``hparams`` (PADDataSelection: ``{"data_selection": {...}}``), collected by
    :func:`~lightning_distill.callbacks.trajectory.store_hparams`."""

    def store_record(self) -> dict[str, Any]: ...


@runtime_checkable
class SelectableTrainData(Protocol):
    """A datamodule whose training loader serves a subset chosen per epoch
    (RealDataModule): a DataSelection callback sets ``train_selection`` to ``epoch ->
    indices`` for a fit and restores it after."""

    train_selection: Callable[[int], Tensor] | None

    def selected_indices(self, epoch: int) -> Tensor: ...


@runtime_checkable
class SyntheticTrainLoader(Protocol):
    """A module that decides the batch order of its synthetic training set (EvalModule:
    per-run seeded generators that travel in its checkpoints); SyntheticDataModule's
    ``train_dataloader`` asks the Trainer's module for it."""

    def synthetic_train_dataloader(self, images: Tensor, labels: Tensor) -> Any: ...


@runtime_checkable
class TrajectorySource(Protocol):
    """A distillation as the callbacks around it see it (DistillationModule): the
    completed outer ``iteration``, the synthetic ``images`` with ``class_ids()``, and
    ``to_pixels`` (input space -> [0, 1] pixels, or None). MatchingWindow and
    SyntheticEMA register themselves in ``setup`` as ``matching_window`` /
    ``synthetic_ema``, which the module reads in every iteration (the window samples the
    start epoch; the EMA is updated right after the step, whatever the callback order)."""

    iteration: Tensor
    images: Tensor
    to_pixels: Callable[[Tensor], Tensor] | None
    matching_window: Any
    synthetic_ema: Any

    def class_ids(self) -> Tensor: ...
