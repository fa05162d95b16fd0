"""`lightning-distill experts`: train N expert trajectories into a TrajectoryStore.

docs/method.md, 'Expert trajectories' and 'Flat experts (FTD, GSAM)': each expert is a fresh
network trained with SGD (+ DSA, + GSAM for FTD/DATM) for E epochs; its E+1 snapshots
(initialisation and after every epoch) go to ``expert_{i:05d}.pt`` of the store
(docs/formats.md, 'Trajectory store').

Reproducibility: expert i draws all its randomness from ``(seed, i)`` and from nothing
else (:func:`expert_seeds`): the initialisation from the global RNGs seeded with
``derive_seed(seed, i)``, the data order from ``derive_seed(seed, i, 1)``, the DSA
parameters from a CPU generator seeded with ``derive_seed(seed, i, 2)``. So an expert
does not depend on which experts were trained before it in the same process, a store
is bit-identical across runs on the same machine, and shards or resumed runs produce
the same experts as one uninterrupted run.

Resuming: an expert file is written atomically when the expert finishes (by
:class:`~lightning_distill.callbacks.TrajectoryRecorder`), never partially. While an
expert (or a group) trains, a Lightning checkpoint of it is kept after every epoch in
``<store>/.partial/<expert_i | experts_i-j>/last.ckpt`` (network, optimizer, the
recorder's snapshots so far, the DSA and data-order streams) and removed once its file
is written. A killed run leaves the finished experts and that checkpoint; running the
same command again resumes the interrupted expert from its last finished epoch (the
same expert as an uninterrupted run, bit for bit on the same machine) and then trains
the missing ones.

Groups (``experts.group_size: K``; the default, null, chooses by device and step size
as the evaluation protocol does, :func:`~lightning_distill.functional.evaluation.auto_group_size`:
8 on an accelerator, on a CPU 8 for steps of at most 32768 pixels, else 1): the missing
experts of this process are trained K at a time as ONE vectorised model
(:class:`~lightning_distill.modules.GroupExpertModule` on a
:class:`~lightning_distill.functional.batched.StackedNetworks`): member k of a group
holding experts [i_1, ..., i_K] takes the seeds of expert i_k above (init, data order,
DSA), SAM / ASAM / GSAM take their norms per member, and
:class:`~lightning_distill.callbacks.GroupTrajectoryRecorder` writes one
``expert_{i_k:05d}.pt`` per member, in the same format, when the group finishes. So
member k IS expert i_k of a one-at-a-time run, up to floating-point rounding (batched
kernels sum in another order: float32 stores agree to ~1e-4 relative after an epoch,
not bit for bit); ``group_size: 1`` is the one-at-a-time path, bit-identical to
earlier versions. Groups are formed from the list of MISSING experts, in index order,
so resuming never retrains a finished expert: a group whose members are all present is
never formed, and after an interrupted group (its files are written together at the
end, so none of them exists) the rerun forms its groups from what is missing. Before a
group trains, its memory is estimated (activations at the batch size + parameters and
optimizer state, :func:`~lightning_distill.functional.batched.check_group_memory`);
a group that would not fit is refused with the estimate and the largest group size
that fits.

Parallelism, two ways (both combine with groups):

- Independent experts (the efficient way, no communication): start one process per GPU
  or node with ``shard_index: k`` and ``num_shards: n`` on the same store directory
  (a shared file system); shard k trains experts k, k+n, k+2n, ... The union of the
  shards equals the unsharded store.
- Data-parallel experts: ``trainer.strategy: ddp`` with ``trainer.devices: G`` (and
  ``trainer.num_nodes``) trains each expert on G devices. Design: this function loops
  over ``fit`` calls, one Trainer per expert. Lightning's launcher re-runs the whole
  command once per extra local rank at the first ``fit``; every rank computes the
  list of missing experts before its first ``fit`` (rank 0 is blocked in the process
  group rendezvous until all ranks have joined, so no expert has been written yet) and
  then walks the same list. Later Trainers reuse the process group (the launcher sees
  ``LOCAL_RANK`` and starts no new processes). Each rank seeds identically; DDP
  averages the gradients (GSAM's final gradient included), so all ranks hold the same
  parameters. Only global rank 0 writes, and all ranks wait at a barrier after each
  write. A guard callback checks in ``setup`` that all ranks agree on the expert
  being trained and on the remaining list, and fails on every rank at once if not
  (e.g. a store directory that is not shared between nodes). Multi-node: launch the
  same command on every node with ``trainer.num_nodes: N`` and the usual
  ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` variables (or SLURM / torchrun, which
  Lightning detects); the store must be on a file system all nodes see. Under DDP each
  rank takes its shard of the expert's shuffled order (``data.loader: batched``, see
  :func:`~lightning_distill.data.datamodule.shard_indices`; with ``loader: dataloader``
  Lightning's DistributedSampler), so a DDP store differs from a single-device one.
  With groups, every rank trains the same group (the guard compares the groups); each
  member's order is sharded over the ranks as the batched loader shards it (whatever
  ``data.loader``), and DDP averages the stacked gradients, i.e. each member's gradient
  over the ranks, exactly as for one expert.

Data selection (PAD, off by default): a
:class:`~lightning_distill.callbacks.PADDataSelection` among the Trainer's callbacks. It
loads the EL2N scores from ``<store>/difficulty_el2n.pt`` (the first expert computes
them; later experts, runs, shards and DDP ranks load the file) and trains every epoch
``e`` on the subset :class:`~lightning_distill.functional.PADSchedule` gives for ``e``;
its settings go to the store's ``hparams["data_selection"]``. With data selection the
experts train one at a time (``group_size`` falls back to 1, with a message): the
schedule reaches the experts through the datamodule's per-epoch loader, which a group's
per-member loader does not use.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from ..callbacks.data_selection import PADDataSelection
from ..callbacks.progress import StageProgressBar
from ..callbacks.same_expert import SameExpertOnAllRanks
from ..callbacks.trajectory import GroupTrajectoryRecorder, TrajectoryRecorder, store_hparams
from ..data.augment import dsa_flip_for
from ..errors import ConfigError, InputError
from ..functional.batched import check_group_memory, chunks
from ..functional.evaluation import auto_group_size
from ..modules.expert import ExpertTrajectoryModule, GroupExpertModule
from ..seeding import expert_seeds
from ..trajectories import TrajectoryStore
from ._common import make_callbacks, prepare, say

__all__ = ["ExpertPlan", "expert_seeds", "run_experts", "train_experts"]


@dataclass
class ExpertPlan:
    """One experts run as :func:`train_experts` resolved it: what :func:`run_experts`
    needs besides the data.

    ``module_kwargs`` are the arguments of ``module_class`` (ExpertTrajectoryModule's are
    also GroupExpertModule's: ``model``, ``model_kwargs``, ``lr``, ``momentum``,
    ``weight_decay``, ``dsa``, ``dsa_strategy``, ``dsa_flip``; the shapes come from the
    data); ``make_trainer(callbacks, version, first)`` builds the Trainer of one expert or
    group (``version`` names its logs, ``first`` is the run's first Trainer) with fresh
    copies of the user's callbacks (SAM / GSAM hold per-fit state)."""

    store: str
    num_experts: int
    epochs: int
    module_kwargs: dict[str, Any]
    make_trainer: Callable[[list[Callback], str, bool], pl.Trainer]
    seed: int = 0
    group_size: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    #: where a group trains (its memory check, the automatic group size)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    hparams: dict[str, Any] = field(default_factory=dict)
    #: the class of a one-at-a-time expert (a user's subclass of ExpertTrajectoryModule
    #: trains with ``group_size: 1``; ``module_kwargs`` then holds its own arguments too)
    module_class: type = ExpertTrajectoryModule


def train_experts(model: ExpertTrajectoryModule, datamodule: pl.LightningDataModule | None,
                  trainer_kwargs: dict[str, Any], *, trainer_class: type = pl.Trainer,
                  store: str = "outputs/experts", num_experts: int = 10,
                  group_size: int | None = None, seed: int = 0, shard_index: int = 0,
                  num_shards: int = 1, log_dir: str | None = None) -> TrajectoryStore:
    """Train the missing experts of ``store`` (this shard's) and return the store.

    Expert i is a fresh ``model`` (the template: its class and arguments; the shapes
    come from the data) trained for ``trainer_kwargs["max_epochs"]`` epochs by a
    ``trainer_class(**trainer_kwargs)`` with fresh copies of its callbacks (GSAM,
    PADDataSelection, ...), all its randomness from ``(seed, i)``. The ``experts``
    subcommand calls this with its Trainer's own arguments (``DistillTrainer.experts``).

    Args:
        model: an :class:`~lightning_distill.ExpertTrajectoryModule` (or a subclass).
        datamodule: the real data (a :class:`~lightning_distill.RealDataModule`).
        trainer_kwargs: the Trainer's arguments (``max_epochs``: every expert's epochs).
        store: the trajectory store's directory.
        num_experts: experts in the store (this run trains the missing ones).
        group_size: experts trained together as one vectorised model (1: one at a
            time; None: chosen by device and step size).
        seed: the experts' base seed.
        shard_index, num_shards: this process trains experts shard_index,
            shard_index + num_shards, ... (several processes on one store).
        log_dir: TensorBoard logs per expert (None: ``logs/`` beside the store) when the
            Trainer's logger is the default.
    """
    if not isinstance(model, ExpertTrajectoryModule):
        raise InputError(f"experts needs an ExpertTrajectoryModule, got {type(model).__name__}")
    if datamodule is None:
        raise ConfigError("experts needs the real data: a datamodule (data: in a recipe)")
    epochs = trainer_kwargs.get("max_epochs")
    if epochs is None:
        raise ConfigError("experts: set trainer.max_epochs (the epochs of every expert)")
    hp = model.hparams
    cls = type(model)
    module_kwargs = {"model": hp.model, "model_kwargs": dict(hp.model_kwargs or {}),
                     "lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay,
                     "dsa": hp.dsa, "dsa_strategy": hp.dsa_strategy,
                     "dsa_flip": hp.dsa_flip if hp.dsa_flip is not None
                     else dsa_flip_for(datamodule.name)}
    if cls is not ExpertTrajectoryModule:
        # a user's subclass: built with its own arguments too (LightningCLI adds
        # `_class_path` and the like to the hparams: not arguments)
        module_kwargs.update({k: v for k, v in hp.items() if not k.startswith("_") and
                              k not in (*module_kwargs, "channels", "num_classes",
                                        "image_size", "dsa_seed")})
    given = trainer_kwargs.get("callbacks") or []
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    # LightningCLI's SaveConfigCallback is shared (it saves the config once); the others
    # are copied afresh for each Trainer
    shared = [c for c in given if type(c).__name__ == "SaveConfigCallback"]
    templates = [c for c in given if c not in shared]
    selections = [c for c in templates if isinstance(c, PADDataSelection)]
    if len(selections) > 1:
        raise ConfigError("experts: one PADDataSelection callback at a time")
    # a vectorised group is GroupExpertModule, which knows nothing of a subclass, and
    # trains from one loader per member, which a selection callback does not reach
    alone = (f"{cls.__name__} is a subclass of ExpertTrajectoryModule"
             if cls is not ExpertTrajectoryModule else
             "a PADDataSelection callback selects the data" if selections else None)
    if alone is not None and group_size != 1:
        say(f"experts: {alone}, so its experts train one at a time (group_size 1, not "
            f"{group_size})")
        group_size = 1
    logs = Path(log_dir) if log_dir is not None else Path(store).parent / "logs"

    def make_trainer(cbs: list[Callback], version: str, first: bool) -> pl.Trainer:
        kw = dict(trainer_kwargs)
        kw["callbacks"] = make_callbacks(kw.get("enable_progress_bar") is not False,
                                         [*copy.deepcopy(templates), *shared, *cbs])
        logger = kw.get("logger")
        kw["logger"] = (TensorBoardLogger(str(logs), name="experts", version=version,
                                          default_hp_metric=False)
                        if logger in (None, True) else copy.deepcopy(logger))
        # the store is what an expert leaves; its own epoch checkpoint (_fit_resumable)
        kw["enable_checkpointing"] = kw.get("enable_checkpointing") is not False or any(
            isinstance(c, ModelCheckpoint) for c in cbs)
        kw["enable_model_summary"] = first and kw.get("enable_model_summary") is not False
        return trainer_class(**kw)

    # group_size does not change the experts (member k is expert k): not an hparam
    hparams = store_hparams(module_kwargs, epochs=int(epochs),
                            batch_size=datamodule.batch_size, callbacks=templates,
                            num_experts=num_experts, seed=seed)
    plan = ExpertPlan(
        store=str(store), num_experts=num_experts, epochs=int(epochs),
        module_kwargs=module_kwargs, make_trainer=make_trainer, seed=seed,
        group_size=group_size, shard_index=shard_index, num_shards=num_shards,
        module_class=cls, device=_group_device(str(trainer_kwargs.get("accelerator", "auto"))),
        hparams=hparams)
    check_plan(plan)  # before any data is read
    prepare(datamodule, "fit")
    return run_experts(plan, datamodule)


def check_plan(plan: ExpertPlan) -> None:
    """Refuse impossible numbers and data-selection settings, saying what to change."""
    if not 0 <= plan.shard_index < plan.num_shards:
        raise InputError(f"shard_index must be in [0, num_shards={plan.num_shards}); "
                         f"got {plan.shard_index}")
    if plan.num_experts < 0 or plan.epochs < 1:
        raise InputError(f"num_experts must be >= 0 and trainer.max_epochs >= 1; got "
                         f"{plan.num_experts} and {plan.epochs}")


def run_experts(plan: ExpertPlan, dm) -> TrajectoryStore:
    """Train the missing experts of ``plan.store`` (this shard's) on ``dm`` (a set-up
    :class:`~lightning_distill.data.RealDataModule`) and return the store."""
    check_plan(plan)
    real = dm.real
    store = TrajectoryStore.create_for_model(
        plan.store,
        name=plan.module_kwargs["model"], channels=real.channels,
        num_classes=real.num_classes, image_size=real.image_size,
        model_kwargs=dict(plan.module_kwargs.get("model_kwargs") or {}),
        num_snapshots=plan.epochs + 1,
        dataset=dm.name,
        input_space=dm.input_space,
        hparams=plan.hparams,
    )
    done = set(store.expert_indices())
    todo = [i for i in range(plan.shard_index, plan.num_experts, plan.num_shards)
            if i not in done]
    shard = f" (shard {plan.shard_index}/{plan.num_shards})" if plan.num_shards > 1 else ""
    if not todo:
        say(f"[green]{plan.store}: all {plan.num_experts} experts{shard} present[/green]")
        return store
    if plan.group_size is not None and plan.group_size < 1:
        raise InputError(f"experts.group_size must be >= 1 or null (chosen by device and "
                         f"step size), got {plan.group_size}")
    group_size = plan.group_size
    if group_size is None:
        group_size = auto_group_size(plan.device, dm.batch_size,
                                     dm.real.image_size)
    plan = replace(plan, group_size=group_size)  # resolved: the messages name it
    groups = chunks(todo, group_size)
    say(f"Training {len(todo)} expert(s){shard} into {plan.store} "
         f"({len(done)} of {plan.num_experts} already present"
         f"{f'; {len(groups)} group(s) of up to {group_size}' if group_size > 1 else ''})")
    start = time.perf_counter()
    finished = 0
    for n, group in enumerate(groups, 1):
        remaining = [i for g in groups[n:] for i in g]
        bar = StageProgressBar("experts", total=len(todo), done=finished, units=len(group))
        if len(group) == 1:
            _train_one(plan, dm, store, group[0], remaining, first=n == 1, progress=bar)
        else:
            _train_group(plan, dm, store, group, remaining, first=n == 1, progress=bar)
        finished += len(group)
        elapsed = time.perf_counter() - start
        left = len(todo) - finished
        eta = f", about {elapsed / finished * left / 60:.1f} min left" if left else ""
        what = f"expert {group[0]}" if len(group) == 1 else f"experts {group}"
        say(f"{what} written ({finished}/{len(todo)} done in {elapsed / 60:.1f} min{eta})")
    say(f"[green]{plan.store}: {len(store.expert_indices())} of {plan.num_experts} experts "
         f"({len(todo)} trained now{shard}, {plan.epochs} epochs each) in "
         f"{(time.perf_counter() - start) / 60:.1f} min[/green]")
    return store


def _shapes(dm) -> dict[str, Any]:
    real = dm.real
    return {"channels": real.channels, "num_classes": real.num_classes,
            "image_size": real.image_size}


def _train_one(plan: ExpertPlan, dm, store: TrajectoryStore, i: int, remaining: list[int],
               first: bool, progress: Callback | None = None) -> None:
    """Expert ``i`` on its own: ``plan.module_class``, :class:`ExpertTrajectoryModule` by
    default (``group_size: 1``)."""
    seeds = expert_seeds(plan.seed, i)
    say(f"expert {i}, seed {seeds['init']}", rule=True)
    pl.seed_everything(seeds["init"], workers=True, verbose=False)
    dm.shuffle_seed = seeds["data"]
    module = plan.module_class(**plan.module_kwargs, **_shapes(dm), dsa_seed=seeds["dsa"])
    cbs: list[Callback] = [SameExpertOnAllRanks(i, remaining),
                           TrajectoryRecorder(store, expert_index=i, module_attr="net"),
                           *([progress] if progress is not None else [])]
    _fit_resumable(plan, store, [i], f"expert_{i:05d}", cbs, first, module, datamodule=dm)


def _group_device(accelerator: str) -> torch.device:
    """The device a group trains on (for the memory check): the CPU unless the trainer
    may use CUDA and CUDA is available."""
    if accelerator in ("cpu",) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _train_group(plan: ExpertPlan, dm, store: TrajectoryStore, group: list[int],
                 remaining: list[int], first: bool, progress: Callback | None = None) -> None:
    """Experts ``group`` as one vectorised model (:class:`GroupExpertModule`)."""
    seeds = [expert_seeds(plan.seed, i) for i in group]
    say(f"experts {group} as one group, seeds {[s['init'] for s in seeds]}", rule=True)
    module = GroupExpertModule(
        **plan.module_kwargs, **_shapes(dm),
        init_seeds=[s["init"] for s in seeds], dsa_seeds=[s["dsa"] for s in seeds],
        expert_indices=group,
    )
    real = dm.real
    check_group_memory(module.net.member(0), (real.channels, *real.image_size),
                       dm.batch_size, len(group), plan.device,
                       where=f"experts.group_size {plan.group_size}")
    cbs: list[Callback] = [SameExpertOnAllRanks(group, remaining),
                           GroupTrajectoryRecorder(store, group, module_attr="net"),
                           _MemberOrder(dm),
                           *([progress] if progress is not None else [])]
    name = f"experts_{group[0]:05d}-{group[-1]:05d}"
    _fit_resumable(plan, store, group, name, cbs, first, module,
                   train_dataloaders=dm.member_train_dataloader([s["data"] for s in seeds]),
                   val_dataloaders=dm.val_dataloader())


class _MemberOrder(Callback):
    """The member loaders' order in a group's checkpoints: a group fits from loaders,
    not from the datamodule (whose state Lightning would keep), so this callback keeps
    the datamodule's state for it."""

    def __init__(self, dm: Any) -> None:
        self.dm = dm

    def state_dict(self) -> dict[str, Any]:
        return self.dm.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dm.load_state_dict(state_dict)


def _fit_resumable(plan: ExpertPlan, store: TrajectoryStore, experts: list[int], name: str,
                   cbs: list[Callback], first: bool, module: pl.LightningModule,
                   **data: Any) -> None:
    """Fit ``module`` (experts ``experts``) with a checkpoint after every epoch in
    ``<store>/.partial/<name>/``, resuming from its ``last.ckpt`` where an earlier run
    was interrupted; the checkpoint goes once the experts' files are written."""
    partial = Path(plan.store) / ".partial" / name
    last = partial / "last.ckpt"
    epoch_checkpoint = ModelCheckpoint(dirpath=partial, filename="last", save_top_k=1,
                                       every_n_epochs=1, save_on_train_epoch_end=True,
                                       enable_version_counter=False)
    if last.exists():
        say(f"{name}: resuming from {last}")
    plan.make_trainer([*cbs, epoch_checkpoint], name, first).fit(
        module, ckpt_path=str(last) if last.exists() else None, **data)
    store.require_written(experts)
    shutil.rmtree(partial, ignore_errors=True)
