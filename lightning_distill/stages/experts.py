"""`lightning-distill experts`: train N expert trajectories into a TrajectoryStore.

REFERENCE section 4: each expert is a fresh network trained with SGD (+ DSA, + GSAM for
FTD/DATM) for E epochs; its E+1 snapshots (initialisation and after every epoch) go to
``expert_{i:05d}.pt`` of the store (ARCHITECTURE.md, "File formats").

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

Parallelism, two ways:

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

Data selection (PAD, off by default; ``data_selection:``, see
:mod:`~lightning_distill.stages.data_selection`): the EL2N scores are computed once into
``<store>/difficulty_el2n.pt`` (before the first expert; later runs, shards and DDP ranks
load the file) and every expert trains epoch ``e`` on the subset
:class:`~lightning_distill.functional.PADSchedule` gives for ``e``; the settings go to the
store's ``hparams["data_selection"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ..callbacks.trajectory import TrajectoryRecorder
from ..config import DataConfig, ModelConfig, TrainerConfig, build_datamodule, derive_seed
from ..data.augment import DSA
from ..models import ParamSpec, build_model
from ..modules.expert import ExpertTrajectoryModule
from ..trajectories import TrajectoryStore
from ._common import console, make_callbacks
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
    """How each expert trains (REFERENCE section 4: SGD 0.01, no momentum, DSA)."""

    num_experts: int = 10
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    check_val_every_n_epoch: int = 1


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


def dsa_flip_for(dataset: str) -> bool:
    """Flip is dropped for digit data sets (REFERENCE section 3; :meth:`DSA.for_dataset`)."""
    return DSA.for_dataset(dataset).flip


def expert_seeds(seed: int, index: int) -> dict[str, int]:
    """The seeds of expert ``index``: ``init`` (global RNGs: initialisation, and the
    DistributedSampler under DDP), ``data`` (training order), ``dsa`` (augmentation)."""
    return {
        "init": derive_seed(seed, index),
        "data": derive_seed(seed, index, 1),
        "dsa": derive_seed(seed, index, 2),
    }


class _SameExpertOnAllRanks(Callback):
    """Under DDP, fail on every rank at once if the ranks disagree on the expert to train
    or on the experts still missing (e.g. a store directory not shared between nodes)."""

    def __init__(self, index: int, todo: Sequence[int]) -> None:
        self.plan = [int(index), *map(int, todo)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size <= 1:
            return
        reference = trainer.strategy.broadcast(self.plan, src=0)
        agree = trainer.strategy.reduce_boolean_decision(reference == self.plan, all=True)
        if not agree:
            raise RuntimeError(
                f"lightning-distill experts: the {trainer.world_size} ranks disagree on the "
                f"experts to train (rank {trainer.global_rank}: {self.plan[:8]}, rank 0: "
                f"{reference[:8]}; [current, remaining...]). Every rank must see the same "
                "store directory: put it on a file system shared by all nodes."
            )


def _say(message: str, rule: bool = False) -> None:
    if rank_zero_only.rank == 0:
        (console.rule if rule else console.print)(message)


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
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={cfg.num_shards}); "
                         f"got {cfg.shard_index}")
    ex = cfg.experts
    if ex.num_experts < 0 or ex.epochs < 1:
        raise ValueError(f"experts.num_experts must be >= 0 and experts.epochs >= 1; got "
                         f"{ex.num_experts} and {ex.epochs}")
    sharpness_callback(cfg.sharpness)  # validate the method name before any work
    check_data_selection(cfg.data_selection)
    dm = build_datamodule(cfg.data, setup="fit")
    real = dm.real
    net = build_model(cfg.model.name, channels=real.channels, num_classes=real.num_classes,
                      image_size=real.image_size, **cfg.model.kwargs)
    store = TrajectoryStore.create(
        cfg.store,
        spec=ParamSpec.of(net),
        num_snapshots=ex.epochs + 1,
        model={"name": cfg.model.name, "channels": real.channels,
               "num_classes": real.num_classes, "image_size": list(real.image_size),
               **cfg.model.kwargs},
        dataset=cfg.data.name,
        input_space=dm.input_space,
        hparams={"experts": asdict(ex), "sharpness": asdict(cfg.sharpness), "seed": cfg.seed,
                 "batch_size": cfg.data.batch_size,
                 **data_selection_hparams(cfg.data_selection)},
    )
    done = set(store.expert_indices())
    todo = [i for i in range(cfg.shard_index, ex.num_experts, cfg.num_shards) if i not in done]
    shard = f" (shard {cfg.shard_index}/{cfg.num_shards})" if cfg.num_shards > 1 else ""
    if not todo:
        _say(f"[green]{cfg.store}: all {ex.num_experts} experts{shard} present[/green]")
        return store
    _say(f"Training {len(todo)} expert(s){shard} into {cfg.store} "
         f"({len(done)} of {ex.num_experts} already present)")
    selection = data_selection_callback(cfg.data_selection, dm, store=store, model=store.model,
                                        trainer=cfg.trainer, batch_size=cfg.data.batch_size)
    flip = dsa_flip_for(cfg.data.name)
    start = time.perf_counter()
    for n, i in enumerate(todo, 1):
        seeds = expert_seeds(cfg.seed, i)
        _say(f"expert {i} ({n}/{len(todo)}), seed {seeds['init']}", rule=True)
        pl.seed_everything(seeds["init"], workers=True, verbose=False)
        dm.shuffle_seed = seeds["data"]
        module = ExpertTrajectoryModule(
            cfg.model.name, channels=real.channels, num_classes=real.num_classes,
            image_size=real.image_size, model_kwargs=dict(cfg.model.kwargs), lr=ex.lr,
            momentum=ex.momentum, weight_decay=ex.weight_decay, dsa=ex.dsa,
            dsa_strategy=ex.dsa_strategy, dsa_flip=flip, dsa_seed=seeds["dsa"],
        )
        cbs: list[Callback] = [_SameExpertOnAllRanks(i, todo[n:]),
                               TrajectoryRecorder(store, expert_index=i, module_attr="net")]
        sharp = sharpness_callback(cfg.sharpness)
        if sharp is not None:
            cbs.append(sharp)
        if selection is not None:
            cbs.append(selection)
        if callbacks is not None:
            cbs.extend(callbacks(i))
        trainer = pl.Trainer(
            max_epochs=ex.epochs,
            callbacks=make_callbacks(cfg.trainer, cbs),
            logger=TensorBoardLogger(cfg.log_dir, name="experts", version=f"expert_{i:05d}",
                                     default_hp_metric=False),
            enable_checkpointing=False,
            enable_model_summary=n == 1,
            check_val_every_n_epoch=ex.check_val_every_n_epoch,
            **cfg.trainer.kwargs(),
        )
        trainer.fit(module, datamodule=dm)
        if not store.expert_path(i).is_file():
            raise RuntimeError(
                f"expert {i} finished training but {store.expert_path(i)} was not written "
                "(training stopped before the last epoch?); see the warnings above"
            )
        elapsed = time.perf_counter() - start
        left = len(todo) - n
        eta = f", about {elapsed / n * left / 60:.1f} min left" if left else ""
        _say(f"expert {i} written ({n}/{len(todo)} done in {elapsed / 60:.1f} min{eta})")
    return store
