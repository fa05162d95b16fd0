"""`lightning-distill experts`: train N expert trajectories into a TrajectoryStore.

Expert i is seeded from ``derive_seed(seed, i)`` (initialisation, data order and DSA),
so a store is reproducible and an interrupted run resumes at the missing experts:
each expert file is written atomically at the end of its training, never partially.

Multi-GPU: ``trainer.strategy: ddp`` with ``trainer.devices: G`` trains each expert
data-parallel (Lightning re-runs this script per GPU; every rank walks the same list
of experts, and only rank 0 writes). Independent experts parallelise better: run one
process per GPU (or node) with ``shard_index: k`` and ``num_shards: n``; shard k
trains experts k, k+n, k+2n, ... into the same store directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from ..config import DataConfig, ModelConfig, TrainerConfig, build_datamodule, derive_seed
from ..models import ParamSpec, build_model
from ..modules.expert import ExpertTrajectoryModule
from ..trajectories import TrajectoryStore
from ._common import console, make_callbacks


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


def sharpness_callback(cfg: SharpnessConfig):
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
    """Flip is dropped for digit data sets (REFERENCE section 3)."""
    return dataset.lower() not in {"mnist", "digits", "svhn"}


def train_experts(cfg: ExpertsConfig) -> TrajectoryStore:
    """Train the missing experts of ``cfg.store`` (this shard's) and return the store."""
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={cfg.num_shards}); "
                         f"got {cfg.shard_index}")
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    real = dm.real
    net = build_model(cfg.model.name, channels=real.channels, num_classes=real.num_classes,
                      image_size=real.image_size, **cfg.model.kwargs)
    ex = cfg.experts
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
                 "batch_size": cfg.data.batch_size},
    )
    done = set(store.expert_indices())
    todo = [i for i in range(cfg.shard_index, ex.num_experts, cfg.num_shards) if i not in done]
    if not todo:
        console.print(f"[green]{cfg.store}: all {ex.num_experts} experts present[/green]")
        return store
    console.print(f"Training {len(todo)} expert(s) into {cfg.store} "
                  f"({len(done)} already present)")
    for n, i in enumerate(todo, 1):
        seed_i = derive_seed(cfg.seed, i)
        console.rule(f"expert {i} ({n}/{len(todo)}), seed {seed_i}")
        pl.seed_everything(seed_i, workers=True, verbose=False)
        dm.shuffle_seed = seed_i
        module = ExpertTrajectoryModule(
            cfg.model.name, channels=real.channels, num_classes=real.num_classes,
            image_size=real.image_size, model_kwargs=dict(cfg.model.kwargs), lr=ex.lr,
            momentum=ex.momentum, weight_decay=ex.weight_decay, dsa=ex.dsa,
            dsa_strategy=ex.dsa_strategy, dsa_flip=dsa_flip_for(cfg.data.name), dsa_seed=seed_i,
        )
        from ..callbacks.trajectory import TrajectoryRecorder

        callbacks = [TrajectoryRecorder(store, expert_index=i, module_attr="net")]
        sharp = sharpness_callback(cfg.sharpness)
        if sharp is not None:
            callbacks.append(sharp)
        trainer = pl.Trainer(
            max_epochs=ex.epochs,
            callbacks=make_callbacks(cfg.trainer, callbacks),
            logger=TensorBoardLogger(cfg.log_dir, name="experts", version=f"expert_{i:05d}",
                                     default_hp_metric=False),
            enable_checkpointing=False,
            check_val_every_n_epoch=ex.check_val_every_n_epoch,
            **cfg.trainer.kwargs(),
        )
        trainer.fit(module, datamodule=dm)
    return store
