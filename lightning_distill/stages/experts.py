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
:class:`~lightning_distill.callbacks.TrajectoryRecorder`), never partially. A killed run
leaves the finished experts and no trace of the interrupted one; running the same
command again trains exactly the missing experts.

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

Data selection (PAD, off by default; ``data_selection:``, see
:mod:`~lightning_distill.stages.data_selection`): the EL2N scores are computed once into
``<store>/difficulty_el2n.pt`` (before the first expert; later runs, shards and DDP ranks
load the file) and every expert trains epoch ``e`` on the subset
:class:`~lightning_distill.functional.PADSchedule` gives for ``e``; the settings go to the
store's ``hparams["data_selection"]``. With data selection the experts train one at a time
(``group_size`` falls back to 1, with a message): the schedule reaches the experts through
the datamodule's per-epoch loader, which a group's per-member loader does not use yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from ..callbacks.progress import StageProgressBar
from ..callbacks.same_expert import SameExpertOnAllRanks
from ..callbacks.trajectory import GroupTrajectoryRecorder, TrajectoryRecorder
from ..config import DataConfig, ModelConfig, TrainerConfig, build_datamodule
from ..data.augment import DEFAULT_DSA_STRATEGY, dsa_flip_for
from ..functional.batched import check_group_memory, chunks
from ..functional.evaluation import auto_group_size
from ..modules.expert import ExpertTrajectoryModule, GroupExpertModule
from ..seeding import expert_seeds
from ..trajectories import TrajectoryStore
from ._common import make_callbacks, say
from .data_selection import (
    DataSelectionConfig,
    check_data_selection,
    data_selection_callback,
    data_selection_hparams,
)

__all__ = [
    "DataSelectionConfig",
    "ExpertTrainingConfig",
    "ExpertsConfig",
    "SharpnessConfig",
    "dsa_flip_for",
    "expert_seeds",
    "sharpness_callback",
    "train_experts",
]


@dataclass
class ExpertTrainingConfig:
    """How each expert trains (MTT's experts: SGD 0.01, no momentum, DSA; docs/method.md, 'Expert
    trajectories');
    ``group_size`` experts train together as one vectorised model (1: one at a time;
    None: chosen by device and step size, :func:`auto_group_size`)."""

    num_experts: int = 10
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: bool = True
    dsa_strategy: str = DEFAULT_DSA_STRATEGY
    check_val_every_n_epoch: int = 1
    group_size: int | None = None


@dataclass
class SharpnessConfig:
    """Flat trajectories (FTD/DATM): method none | sam | asam | gsam."""

    method: str = "gsam"
    rho: float = 0.01
    alpha: float = 0.3


@dataclass
class ExpertsConfig:
    """Everything ``lightning-distill experts`` needs; the keys of ``experts.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertTrainingConfig = field(default_factory=ExpertTrainingConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    store: str = "outputs/digits/experts"
    log_dir: str = "outputs/digits/logs"
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    data_selection: DataSelectionConfig = field(default_factory=DataSelectionConfig)


def sharpness_callback(cfg: SharpnessConfig) -> Callback | None:
    """The SAM / ASAM / GSAM callback for ``cfg`` (None for method "none")."""
    from ..callbacks.sharpness import ASAM, GSAM, SAM

    method = cfg.method.lower()
    if method == "none":
        return None
    if method == "sam":
        return SAM(rho=cfg.rho)
    if method == "asam":
        return ASAM(rho=cfg.rho)
    if method == "gsam":
        return GSAM(rho=cfg.rho, alpha=cfg.alpha)
    raise ValueError(f"sharpness.method must be none, sam, asam or gsam; got {cfg.method!r}")


@dataclass
class ExpertPlan:
    """One experts run, however it was configured (a stage dataclass, a LightningCLI
    config, Python): what :func:`run_experts` needs besides the data.

    ``module_kwargs`` are the arguments ExpertTrajectoryModule and GroupExpertModule share
    (``model``, ``model_kwargs``, ``lr``, ``momentum``, ``weight_decay``, ``dsa``,
    ``dsa_strategy``, ``dsa_flip``; the shapes come from the data); ``make_trainer(callbacks,
    version, first)`` builds the Trainer of one expert or group (``version`` names its
    logs, ``first`` is the run's first Trainer); ``extra_callbacks(indices)`` the callbacks
    it adds for those experts (fresh ones each time: SAM / GSAM hold per-fit state)."""

    store: str
    num_experts: int
    epochs: int
    module_kwargs: dict[str, Any]
    make_trainer: Callable[[list[Callback], str, bool], pl.Trainer]
    extra_callbacks: Callable[[Sequence[int]], list[Callback]]
    seed: int = 0
    group_size: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    data_selection: DataSelectionConfig = field(default_factory=DataSelectionConfig)
    accelerator: str = "auto"
    hparams: dict[str, Any] = field(default_factory=dict)
    #: the class of a one-at-a-time expert (a user's subclass of ExpertTrajectoryModule
    #: trains with ``group_size: 1``; ``module_kwargs`` then holds its own arguments too)
    module_class: type = ExpertTrajectoryModule


def train_experts(
    cfg: ExpertsConfig,
    callbacks: Callable[[int], Sequence[Callback]] | None = None,
) -> TrajectoryStore:
    """Train the missing experts of ``cfg.store`` (this shard's) and return the store.

    Args:
        cfg: the stage configuration (``experts.yaml``).
        callbacks: optional factory ``expert_index -> callbacks`` whose callbacks are
            added to that expert's Trainer (e.g. early diagnostics, a profiler hook).
    """
    ex = cfg.experts
    sharpness_callback(cfg.sharpness)  # validate the method name before any work

    def make_trainer(cbs: list[Callback], version: str, first: bool) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=ex.epochs,
            callbacks=make_callbacks(cfg.trainer.enable_progress_bar, cbs),
            logger=TensorBoardLogger(cfg.log_dir, name="experts", version=version,
                                     default_hp_metric=False),
            enable_checkpointing=False,
            enable_model_summary=first,
            check_val_every_n_epoch=ex.check_val_every_n_epoch,
            **cfg.trainer.kwargs(),
        )

    def extra(indices: Sequence[int]) -> list[Callback]:
        out: list[Callback] = []
        sharp = sharpness_callback(cfg.sharpness)
        if sharp is not None:
            out.append(sharp)
        if callbacks is not None:
            for i in indices:
                out.extend(callbacks(i))
        return out

    plan = ExpertPlan(
        store=cfg.store, num_experts=ex.num_experts, epochs=ex.epochs,
        module_kwargs={"model": cfg.model.name, "model_kwargs": dict(cfg.model.kwargs),
                       "lr": ex.lr, "momentum": ex.momentum, "weight_decay": ex.weight_decay,
                       "dsa": ex.dsa, "dsa_strategy": ex.dsa_strategy,
                       "dsa_flip": dsa_flip_for(cfg.data.name)},
        make_trainer=make_trainer, extra_callbacks=extra, seed=cfg.seed,
        group_size=ex.group_size, shard_index=cfg.shard_index, num_shards=cfg.num_shards,
        data_selection=cfg.data_selection, accelerator=cfg.trainer.accelerator,
        # group_size does not change the experts (member k is expert k): not an hparam
        hparams={"experts": {k: v for k, v in asdict(ex).items() if k != "group_size"},
                 "sharpness": asdict(cfg.sharpness), "seed": cfg.seed,
                 "batch_size": cfg.data.batch_size},
    )
    check_plan(plan)  # before any data is read
    return run_experts(plan, build_datamodule(cfg.data, setup="fit"))


def check_plan(plan: ExpertPlan) -> None:
    """Refuse impossible numbers and data-selection settings, saying what to change."""
    if not 0 <= plan.shard_index < plan.num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={plan.num_shards}); "
                         f"got {plan.shard_index}")
    if plan.num_experts < 0 or plan.epochs < 1:
        raise ValueError(f"experts.num_experts must be >= 0 and experts.epochs >= 1; got "
                         f"{plan.num_experts} and {plan.epochs}")
    check_data_selection(plan.data_selection)


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
        hparams={**plan.hparams, **data_selection_hparams(plan.data_selection)},
    )
    done = set(store.expert_indices())
    todo = [i for i in range(plan.shard_index, plan.num_experts, plan.num_shards)
            if i not in done]
    shard = f" (shard {plan.shard_index}/{plan.num_shards})" if plan.num_shards > 1 else ""
    if not todo:
        say(f"[green]{plan.store}: all {plan.num_experts} experts{shard} present[/green]")
        return store
    if plan.group_size is not None and plan.group_size < 1:
        raise ValueError(f"experts.group_size must be >= 1 or null (chosen by device and "
                         f"step size), got {plan.group_size}")
    group_size = plan.group_size
    if group_size is None:
        group_size = auto_group_size(_group_device(plan.accelerator), dm.batch_size,
                                     dm.real.image_size)
    if plan.data_selection.enabled and group_size > 1:
        # the schedule is applied through the datamodule's per-epoch loader, which a group
        # (one loader per member) does not use yet
        say(f"data_selection: experts train one at a time (group_size {group_size} -> 1)")
        group_size = 1
    plan = replace(plan, group_size=group_size)  # resolved: the messages name it
    groups = chunks(todo, group_size)
    say(f"Training {len(todo)} expert(s){shard} into {plan.store} "
         f"({len(done)} of {plan.num_experts} already present"
         f"{f'; {len(groups)} group(s) of up to {group_size}' if group_size > 1 else ''})")
    selection = data_selection_callback(
        plan.data_selection, dm, store=store, model=store.model,
        trainer=TrainerConfig(accelerator=plan.accelerator), batch_size=dm.batch_size)
    start = time.perf_counter()
    finished = 0
    for n, group in enumerate(groups, 1):
        remaining = [i for g in groups[n:] for i in g]
        bar = StageProgressBar("experts", total=len(todo), done=finished, units=len(group))
        if len(group) == 1:
            _train_one(plan, dm, store, group[0], remaining, first=n == 1,
                       selection=selection, progress=bar)
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


def _check_written(store: TrajectoryStore, indices: Sequence[int]) -> None:
    for i in indices:
        if not store.expert_path(i).is_file():
            raise RuntimeError(
                f"expert {i} finished training but {store.expert_path(i)} was not written "
                "(training stopped before the last epoch?); see the warnings above"
            )


def _shapes(dm) -> dict[str, Any]:
    real = dm.real
    return {"channels": real.channels, "num_classes": real.num_classes,
            "image_size": real.image_size}


def _train_one(plan: ExpertPlan, dm, store: TrajectoryStore, i: int, remaining: list[int],
               first: bool, selection: Callback | None = None,
               progress: Callback | None = None) -> None:
    """Expert ``i`` on its own: ``plan.module_class``, :class:`ExpertTrajectoryModule` by
    default (``group_size: 1``)."""
    seeds = expert_seeds(plan.seed, i)
    say(f"expert {i}, seed {seeds['init']}", rule=True)
    pl.seed_everything(seeds["init"], workers=True, verbose=False)
    dm.shuffle_seed = seeds["data"]
    module = plan.module_class(**plan.module_kwargs, **_shapes(dm), dsa_seed=seeds["dsa"])
    cbs: list[Callback] = [SameExpertOnAllRanks(i, remaining),
                           TrajectoryRecorder(store, expert_index=i, module_attr="net"),
                           *([selection] if selection is not None else []),
                           *([progress] if progress is not None else []),
                           *plan.extra_callbacks([i])]
    plan.make_trainer(cbs, f"expert_{i:05d}", first).fit(module, datamodule=dm)
    _check_written(store, [i])


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
                       dm.batch_size, len(group), _group_device(plan.accelerator),
                       where=f"experts.group_size {plan.group_size}")
    cbs: list[Callback] = [SameExpertOnAllRanks(group, remaining),
                           GroupTrajectoryRecorder(store, group, module_attr="net"),
                           *([progress] if progress is not None else []),
                           *plan.extra_callbacks(group)]
    name = f"experts_{group[0]:05d}-{group[-1]:05d}"
    plan.make_trainer(cbs, name, first).fit(
        module, train_dataloaders=dm.member_train_dataloader([s["data"] for s in seeds]),
        val_dataloaders=dm.val_dataloader())
    _check_written(store, group)
