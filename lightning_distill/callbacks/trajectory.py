"""TrajectoryRecorder: record an expert trajectory into a TrajectoryStore.

MTT (Cazenavette et al., CVPR 2022); docs/method.md, section 'Expert trajectories'.

An expert trajectory is theta_0 (initialisation), theta_1, ..., theta_E: the flat
parameter vector (``named_parameters()`` order) at the start of training and after
every epoch, E+1 snapshots for E epochs (MTT section 3; with ``every_n_epochs=k``,
the snapshots after epochs 0, k, 2k, ..., E).

In a Lightning project of your own (a stock ``LightningCLI(ExpertTrajectoryModule,
RealDataModule)`` or ``Trainer.fit(module, datamodule=dm)``) the recorder needs only the
store's path: a store that does not exist yet is created from the module and the
datamodule, and the expert index defaults to the store's first missing one, so running
the same command again trains the next expert (the YAML of such a run:
:class:`~lightning_distill.ExpertTrajectoryModule`'s docstring, and the README's
"Using the pieces in your own Lightning project", which a test runs).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from ..errors import ConfigError, InputError, InputTypeError, StateError
from ..io import atomic_save
from ..models.params import flatten_parameters
from ..protocols import StoreRecord
from ..trajectories import META_FILE, TrajectoryStore
from .sharpness import sharpness_settings

#: module hyperparameters that the store's ``model`` entry holds, or that differ from one
#: expert to the next (seeds, store indices) or do not change the experts (the group
#: backend): not written to the store's ``hparams``
_NOT_STORE_HPARAMS = frozenset({
    "model", "channels", "num_classes", "image_size", "model_kwargs", "dsa_seed",
    "init_seeds", "dsa_seeds", "expert_indices", "backend"})

__all__ = ["GroupTrajectoryRecorder", "TrajectoryRecorder"]


class TrajectoryRecorder(Callback):
    """Snapshot the parameters at ``on_train_start`` and every epoch end; write one expert.

    Snapshots are kept in CPU memory as float32 copies (``num_snapshots x P`` floats)
    and written with :meth:`TrajectoryStore.write_expert` (atomically) at
    ``on_train_end``, by global rank 0 only; the other ranks wait at a barrier, so the
    file exists everywhere once ``fit`` returns. If training ends before the last
    epoch (early stopping, ``max_steps``, a time limit), nothing is written and a
    warning is issued: a partial expert must never land in the store. With
    ``allow_partial=True`` the partial trajectory goes to ``expert_XXXXX.partial.pt``
    (``{"epochs": LongTensor[k], "snapshots": Tensor[k, P]}``) beside the store, a file
    the store ignores. An interrupted ``fit`` (exception, kill) writes nothing.

    The snapshots collected so far are part of the callback's state, so resuming a
    Lightning checkpoint (``fit(ckpt_path=...)``) in the middle of an expert continues
    the same trajectory.

    The store and the index are settled in ``setup`` when the store exists and the
    recorded network is built, otherwise in ``on_fit_start`` (after Lightning's
    ``configure_model``, where :class:`~lightning_distill.ExpertTrajectoryModule` builds a
    network whose shapes come from the datamodule):

    - a ``store`` path without ``meta.json`` is created with
      :meth:`TrajectoryStore.create_for_model` from the module's hyperparameters
      ``model``, ``channels``, ``num_classes``, ``image_size``, ``model_kwargs``
      (ExpertTrajectoryModule's), the datamodule's ``name`` and ``input_space``
      (RealDataModule's) and ``num_snapshots = max_epochs / every_n_epochs + 1``; its
      ``hparams`` are ``{"module": the module's other hyperparameters (not the seeds,
      which differ from one expert to the next), "epochs", "batch_size": the
      datamodule's, "sharpness": the SAM / ASAM / GSAM callback's {method, rho, alpha,
      adaptive} or {method: "none"}}``. On every rank (rank 0 first, the others after a
      barrier), so that all ranks agree.
    - ``expert_index=None`` takes the store's first missing index when the fit starts, or,
      when ``fit`` resumes a checkpoint, the index the checkpoint was recording (the
      state key of an automatic recorder does not contain the index). Two processes
      writing into one store at once must give explicit indices.
    - the datamodule's ``input_space``, when it has one, must match the store's
      (:meth:`~lightning_distill.data.InputSpace.matches`), so that experts of two input
      spaces (ZCA switched on between two runs, say) never share a store.

    Args:
        store: a :class:`~lightning_distill.TrajectoryStore` or its path (created when it
            does not hold a store yet, see above).
        expert_index: the expert's index in the store (file ``expert_{index:05d}.pt``);
            None: the first missing one (see above).
        every_n_epochs: snapshot after every n-th epoch; ``max_epochs`` must equal
            ``(store.num_snapshots - 1) * every_n_epochs``.
        module_attr: (dotted) attribute of the LightningModule whose parameters are
            recorded, e.g. ``"net"``; ``None``: the module's ``trajectory_module_attr`` if
            it has one (:class:`~lightning_distill.ExpertTrajectoryModule`: ``"net"``),
            otherwise the whole LightningModule.
        allow_partial: save an incomplete trajectory to ``expert_XXXXX.partial.pt``.

    Example::

        from lightning_distill import ExpertTrajectoryModule, RealDataModule
        from lightning_distill.callbacks import GSAM, TrajectoryRecorder

        dm = RealDataModule("cifar10", zca=True)
        module = ExpertTrajectoryModule("ConvNet")  # channels, num_classes, image_size: dm's
        trainer = pl.Trainer(max_epochs=50, callbacks=[
            GSAM(rho=0.01, alpha=0.3), TrajectoryRecorder("outputs/cifar10/experts")])
        trainer.fit(module, datamodule=dm)  # expert 0; the same again: expert 1, ...

    With a store made beforehand (:meth:`TrajectoryStore.create`, any module)::

        store = TrajectoryStore.create(
            "experts/", spec=ParamSpec.of(module.net), num_snapshots=51,
            model={"name": "ConvNet", "channels": 3, "num_classes": 10, "image_size": 32},
            dataset="cifar10", input_space=dm.input_space, hparams={"lr": 0.01},
        )
        trainer = pl.Trainer(max_epochs=50, callbacks=[
            TrajectoryRecorder(store, expert_index=store.first_missing(), module_attr="net")])
    """

    def __init__(
        self,
        store: str | os.PathLike | TrajectoryStore,
        expert_index: int | None = None,
        every_n_epochs: int = 1,
        module_attr: str | None = None,
        allow_partial: bool = False,
    ) -> None:
        super().__init__()
        if expert_index is not None and int(expert_index) < 0:
            raise InputError(f"expert_index must be >= 0, got {expert_index}")
        if int(every_n_epochs) < 1:
            raise InputError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self._store_arg = store
        self.store: TrajectoryStore | None = store if isinstance(store, TrajectoryStore) else None
        self._auto_index = expert_index is None
        self.expert_index: int | None = None if expert_index is None else int(expert_index)
        self.every_n_epochs = int(every_n_epochs)
        self.module_attr = module_attr
        self.allow_partial = allow_partial
        self._prepared = False
        self._snapshots: dict[int, Tensor] = {}  # epoch -> flat float32 CPU parameters

    @property
    def state_key(self) -> str:
        # an automatic index is not known before the fit (nor the same after a resume)
        return self._generate_state_key(
            expert_index="auto" if self._auto_index else self.expert_index)

    # ------------------------------------------------------------------ helpers
    def _attr(self, pl_module: pl.LightningModule) -> str | None:
        """The recorded attribute path: ``module_attr``, else the module's own choice."""
        if self.module_attr is not None:
            return self.module_attr
        return getattr(pl_module, "trajectory_module_attr", None)

    def _target(self, pl_module: pl.LightningModule, built: bool = True) -> nn.Module | None:
        """The recorded module; with ``built=False``, None while it is still None (a
        network built later, in ``configure_model``)."""
        attr = self._attr(pl_module)
        if attr is None:
            return pl_module
        obj: Any = pl_module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(
                    f"TrajectoryRecorder(module_attr={attr!r}): "
                    f"{type(pl_module).__name__} has no attribute path {attr!r}; give the "
                    "attribute that holds the network (e.g. 'net'), or null for the module"
                )
            obj = getattr(obj, part)
        if obj is None and not built:
            return None
        if not isinstance(obj, nn.Module):
            raise InputTypeError(
                f"TrajectoryRecorder(module_attr={attr!r}) is a "
                f"{type(obj).__name__}, expected an nn.Module"
            )
        return obj

    def _flat(self, target: nn.Module) -> Tensor:
        """The recorded vector of ``target``: its flat parameters [P]."""
        return flatten_parameters(target)

    def _record(self, pl_module: pl.LightningModule, epoch: int) -> None:
        with torch.no_grad():
            flat = self._flat(self._target(pl_module)).detach()
        self._snapshots[epoch] = flat.to(device="cpu", dtype=torch.float32)

    def _points(self) -> list[int]:
        """Epochs at which a snapshot is due: 0, n, 2n, ..., (S-1) n."""
        assert self.store is not None
        return [r * self.every_n_epochs for r in range(self.store.num_snapshots)]

    @property
    def recorded_epochs(self) -> list[int]:
        """Epochs (completed epochs count) of the snapshots held so far."""
        return sorted(self._snapshots)

    # -------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._prepared = False
        if self._auto_index:
            self.expert_index = None  # chosen for this fit
        if self.store is None and (Path(self._store_arg) / META_FILE).exists():
            self.store = TrajectoryStore.open(self._store_arg)
        target = self._target(pl_module, built=False)
        if self.store is not None and target is not None:
            self._prepare(trainer, target)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prepared:
            return
        if self.store is None:
            self.store = self._create_store(trainer, pl_module)
        self._prepare(trainer, self._target(pl_module))

    def _prepare(self, trainer: pl.Trainer, target: nn.Module) -> None:
        """Index, model and ``max_epochs`` checks, once the store and the network exist."""
        assert self.store is not None
        if self.expert_index is None:
            self.expert_index = self.store.first_missing()
        self._check_model(target)
        self._check_input_space(trainer)
        self._prepared = True
        max_epochs = trainer.max_epochs
        expected = (self.store.num_snapshots - 1) * self.every_n_epochs
        if max_epochs is not None and max_epochs != -1 and max_epochs != expected:
            raise InputError(
                f"TrajectoryRecorder: Trainer(max_epochs={max_epochs}) but the store "
                f"{self.store.path} holds {self.store.num_snapshots} snapshots per expert "
                f"(every_n_epochs={self.every_n_epochs}), i.e. max_epochs={expected}"
            )
        for index in self._indices():
            if trainer.is_global_zero and self.store.expert_path(index).exists():
                warnings.warn(
                    f"{self.store.expert_path(index)} exists and will be overwritten "
                    "when this expert finishes",
                    stacklevel=2,
                )

    @property
    def store_path(self) -> Path:
        """The store's directory (whether or not it exists yet)."""
        if self.store is not None:
            return Path(self.store.path)
        arg = self._store_arg
        return Path(arg.path if isinstance(arg, TrajectoryStore) else arg)

    def _create_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                      ) -> TrajectoryStore:
        """A new store for the module's experts (class docstring), on every rank."""
        name = type(self).__name__
        hp = dict(getattr(pl_module, "hparams", {}) or {})
        missing = [k for k in ("model", "channels", "num_classes", "image_size")
                   if hp.get(k) is None]
        if missing:
            raise InputError(
                f"{name}: {self._store_arg} is not a trajectory store yet, and "
                f"{type(pl_module).__name__} has no hyperparameters {missing} to create it "
                "from (ExpertTrajectoryModule has them); create the store first "
                "(TrajectoryStore.create) or record an ExpertTrajectoryModule")
        dm = trainer.datamodule
        dataset = getattr(dm, "name", None)
        try:
            input_space = getattr(dm, "input_space", None)
        except RuntimeError:  # RealDataModule before setup()
            input_space = None
        if dataset is None or input_space is None:
            raise InputError(
                f"{name}: {self._store_arg} is not a trajectory store yet; creating it needs "
                "the data set's name and input space from the Trainer's datamodule "
                "(RealDataModule's name and input_space), but "
                f"{'there is no datamodule' if dm is None else type(dm).__name__ + ' lacks them'}"
                "; fit with datamodule=RealDataModule(...) or create the store first")
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1 or max_epochs % self.every_n_epochs:
            raise InputError(
                f"{name}: creating {self._store_arg} needs Trainer(max_epochs) set to a "
                f"multiple of every_n_epochs={self.every_n_epochs} (the number of snapshots "
                f"is max_epochs / every_n_epochs + 1), got max_epochs={max_epochs}")
        hparams = store_hparams(hp, epochs=int(max_epochs),
                                batch_size=getattr(dm, "batch_size", None),
                                callbacks=trainer.callbacks)
        kwargs = dict(
            name=hp["model"], channels=hp["channels"], num_classes=hp["num_classes"],
            image_size=hp["image_size"], model_kwargs=dict(hp.get("model_kwargs") or {}),
            num_snapshots=max_epochs // self.every_n_epochs + 1, dataset=dataset,
            input_space=input_space, hparams=hparams)
        if trainer.is_global_zero:
            store = TrajectoryStore.create_for_model(self._store_arg, **kwargs)
        trainer.strategy.barrier(f"{name}.create_store")
        if not trainer.is_global_zero:  # opens rank 0's store (a node-local one elsewhere)
            store = TrajectoryStore.create_for_model(self._store_arg, **kwargs)
        return store

    def _check_model(self, target: nn.Module) -> None:
        assert self.store is not None
        self.store.check_model(target)

    def _check_input_space(self, trainer: pl.Trainer) -> None:
        """Refuse a datamodule whose input space differs from the store's (InputSpace's
        ``matches`` rule), e.g. the same command run again with ZCA switched on."""
        assert self.store is not None
        try:
            space = getattr(getattr(trainer, "datamodule", None), "input_space", None)
        except RuntimeError:  # RealDataModule before setup()
            space = None
        diff = None if space is None else self.store.input_space.mismatch(space)
        if diff is not None:
            raise InputError(
                f"{type(self).__name__}: the datamodule's input space differs from the "
                f"store {self.store.path}'s ({diff}, store vs data); experts of different "
                "input spaces cannot share a store: use another store directory")

    def _indices(self) -> list[int]:
        """The store indices this recorder writes."""
        return [self.expert_index]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        done = trainer.current_epoch  # completed epochs: 0, or where a checkpoint resumes
        missing = [p for p in self._points() if p < done and p not in self._snapshots]
        if missing:
            raise StateError(
                f"TrajectoryRecorder(expert_index={self.expert_index}): training resumes at "
                f"epoch {done} but the snapshots after epochs {missing} are missing (a "
                "checkpoint without this callback's state?); restart this expert from scratch"
            )
        # Fresh start: theta_0. Resuming at an epoch boundary whose snapshot the
        # checkpoint predates: the current parameters are that snapshot.
        if done in self._points() and done not in self._snapshots:
            self._record(pl_module, done)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        done = trainer.current_epoch + 1  # the epoch just finished, counted from 1
        if done in self._points():
            self._record(pl_module, done)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write()
        trainer.strategy.barrier("TrajectoryRecorder.on_train_end")

    def _label(self) -> str:
        return f"expert {self.expert_index}"

    def _split(self, stacked: Tensor) -> list[tuple[int, Tensor]]:
        """``(store index, [E, P] trajectory)`` of each recorded expert, from the snapshots
        stacked along dim 0."""
        return [(self.expert_index, stacked)]

    def _write(self) -> None:
        assert self.store is not None
        points = self._points()
        missing = [p for p in points if p not in self._snapshots]
        if missing:
            msg = (
                f"{type(self).__name__}: training of {self._label()} ended with "
                f"snapshots after epochs {self.recorded_epochs} but the store needs "
                f"{len(points)} (epochs 0..{points[-1]}, missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}); "
            )
            if self.allow_partial and self._snapshots:
                epochs = self.recorded_epochs
                stacked = torch.stack([self._snapshots[e] for e in epochs])
                paths = []
                for index, trajectory in self._split(stacked):
                    path = self.store.path / f"expert_{index:05d}.partial.pt"
                    atomic_save({"epochs": torch.tensor(epochs, dtype=torch.long),
                                 "snapshots": trajectory}, path)
                    paths.append(str(path))
                warnings.warn(msg + f"the partial trajectory was saved to {', '.join(paths)}",
                              stacklevel=2)
            else:
                warnings.warn(msg + "nothing was written to the store", stacklevel=2)
            return
        stacked = torch.stack([self._snapshots[p] for p in points])
        for index, trajectory in self._split(stacked):
            self.store.write_expert(index, trajectory)
        self._snapshots.clear()

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        epochs = self.recorded_epochs
        return {
            "expert_index": self.expert_index,
            "every_n_epochs": self.every_n_epochs,
            "epochs": torch.tensor(epochs, dtype=torch.long),
            "snapshots": (
                torch.stack([self._snapshots[e] for e in epochs]) if epochs else torch.empty(0)
            ),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["expert_index"]
        if self._auto_index:
            if saved is not None:  # resume the expert the checkpoint was recording
                self.expert_index = int(saved)
        elif saved is None or int(saved) != self.expert_index:
            raise InputError(
                f"TrajectoryRecorder state is for expert {saved}, "
                f"this recorder records expert {self.expert_index}"
            )
        if int(state_dict.get("every_n_epochs", 1)) != self.every_n_epochs:
            raise InputError(
                f"TrajectoryRecorder state was recorded with every_n_epochs="
                f"{state_dict.get('every_n_epochs')}, this recorder uses {self.every_n_epochs}"
            )
        epochs = [int(e) for e in state_dict["epochs"].tolist()]
        snaps = state_dict["snapshots"]
        self._snapshots = {
            e: snaps[k].to("cpu", torch.float32).clone() for k, e in enumerate(epochs)
        }


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class GroupTrajectoryRecorder(TrajectoryRecorder):
    """:class:`TrajectoryRecorder` for K experts trained as one group.

    The recorded module (``module_attr``) is a
    :class:`~lightning_distill.functional.batched.StackedNetworks`; each snapshot is its
    ``flat_members()`` ``[K, P]`` (member k's ``named_parameters()`` order), and at the end
    member k's trajectory ``[snapshots, P]`` is written as expert ``expert_indices[k]``, in
    the same format, atomically, one file per member. Everything else (global rank 0
    writes, the barrier, no partial file in the store, checkpointed state) is as for one
    expert.

    Args:
        store: the store or its path.
        expert_indices: the members' store indices, in member order.
        every_n_epochs, module_attr, allow_partial: as :class:`TrajectoryRecorder`
            (partial files: ``expert_XXXXX.partial.pt`` per member).
    """

    def __init__(
        self,
        store: TrajectoryStore | str | os.PathLike,
        expert_indices: list[int] | tuple[int, ...],
        every_n_epochs: int = 1,
        module_attr: str | None = "net",
        allow_partial: bool = False,
    ) -> None:
        indices = [int(i) for i in expert_indices]
        if not indices or len(set(indices)) != len(indices):
            raise InputError(f"expert_indices must be distinct and non-empty, got {indices}")
        super().__init__(store, indices[0], every_n_epochs, module_attr, allow_partial)
        self.expert_indices = indices

    @property
    def state_key(self) -> str:
        return self._generate_state_key(expert_indices=tuple(self.expert_indices))

    def _indices(self) -> list[int]:
        return list(self.expert_indices)

    def _flat(self, target: nn.Module) -> Tensor:
        flat = target.flat_members()  # type: ignore[operator]
        if flat.shape[0] != len(self.expert_indices):
            raise InputError(
                f"GroupTrajectoryRecorder: the module has {flat.shape[0]} members but "
                f"{len(self.expert_indices)} expert indices were given"
            )
        return flat

    def _check_model(self, target: nn.Module) -> None:
        assert self.store is not None
        member = getattr(target, "member", None)
        if member is None:
            raise InputTypeError(
                f"GroupTrajectoryRecorder: {type(target).__name__} is not a group of "
                "networks (StackedNetworks); use TrajectoryRecorder for one expert"
            )
        self.store.check_model(member(0))

    def _label(self) -> str:
        return f"experts {self.expert_indices}"

    def _split(self, stacked: Tensor) -> list[tuple[int, Tensor]]:
        # [E, K, P] -> member k's [E, P] (a copy: a view would save the whole group)
        return [(index, stacked[:, k].clone()) for k, index in enumerate(self.expert_indices)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["expert_indices"] = list(self.expert_indices)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [int(i) for i in state_dict.get("expert_indices", [])] != self.expert_indices:
            raise InputError(
                f"GroupTrajectoryRecorder state is for experts "
                f"{state_dict.get('expert_indices')}, this recorder records {self.expert_indices}"
            )
        super().load_state_dict(state_dict)


def store_hparams(module: dict[str, Any], *, epochs: int, batch_size: int | None,
                  callbacks: Any = (), **run: Any) -> dict[str, Any]:
    """The training hyperparameters a trajectory store records in ``meta.json``
    (docs/formats.md, 'Trajectory store'), written by the experts stage and by a
    :class:`TrajectoryRecorder` that creates its store alike: ``module`` (the expert
    module's arguments that are JSON values, without shapes and seeds), ``epochs``,
    ``batch_size``, ``sharpness`` (the SAM / ASAM / GSAM callback's settings, or
    ``{"method": "none"}``), what a callback's ``store_record()`` returns
    (PADDataSelection: ``data_selection``) and what the run adds (the experts stage:
    ``num_experts``, ``seed``)."""
    out = {"module": {k: v for k, v in dict(module).items()  # not LightningCLI's "_..."
                      if k not in _NOT_STORE_HPARAMS and not k.startswith("_") and _is_json(v)},
           "epochs": int(epochs), "batch_size": batch_size,
           "sharpness": sharpness_settings(callbacks)}
    for c in callbacks or ():  # a callback that changes what the experts train on
        if isinstance(c, StoreRecord):
            out.update(c.store_record())
    return {**out, **run}
