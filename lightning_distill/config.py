"""Configuration dataclasses shared by the CLI stages and the YAML recipes.

Every recipe in ``recipes/`` is a YAML file whose keys are these dataclasses' fields;
the CLI (``lightning-distill STAGE --config FILE.yaml --data.root /data``) parses them
with jsonargparse, so dotted overrides and ``--print_config`` work for every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# derive_seed lives in lightning_distill.seeding; re-exported for older imports
from .seeding import derive_seed

__all__ = ["DataConfig", "ModelConfig", "TrainerConfig", "build_datamodule", "derive_seed"]


@dataclass
class DataConfig:
    """The real data set and its input space (docs/method.md, section 'ZCA whitening and
    normalisation').

    Attributes:
        name: a registered data set (digits, fashion_mnist, mnist, cifar10, cifar100,
            svhn, tiny_imagenet, image_folder).
        root: where the files are (None: the data set's default search path).
        batch_size: real-data batch size (experts: 256; evaluation of real baselines).
        val_fraction: held-out part of the training set, for model selection.
        zca: ZCA-whiten (CIFAR recipes) instead of mean/std normalisation.
        zca_regularization: the 0.1 added to the eigenvalues.
        split_seed: seeds the train/validation split (fixed across stages).
        num_workers: DataLoader workers (> 0 implies loader "dataloader").
        loader: "batched" (one in-memory gather per batch, same batches as the DataLoader
            for the same seed; RealDataModule's default) or "dataloader"
            (torch DataLoader, per-sample indexing and collation).
        kwargs: extra keywords for the data set loader (e.g. image_size for image_folder).
    """

    name: str = "digits"
    root: str | None = None
    batch_size: int = 256
    val_fraction: float = 0.1
    zca: bool = False
    zca_regularization: float = 0.1
    split_seed: int = 0
    num_workers: int = 0
    loader: str = "batched"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A ``build_model`` name and its keywords (width, depth, norm, act, pooling)."""

    name: str = "ConvNet"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """Keywords passed to every ``pytorch_lightning.Trainer`` a stage creates.

    ``log_every_n_steps``: None is the stage's own cadence (every iteration for a
    distillation, whose iterations take seconds; 10 steps in the other stages).

    ``deterministic``: runs on the CPU are reproducible without it. On CUDA, ``true``
    makes PyTorch refuse operations without a deterministic kernel, and the backward of
    ``grid_sample`` (DSA's scale and rotate) is one: with DSA on a GPU use ``"warn"``.
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int | None = None
    enable_progress_bar: bool = True
    deterministic: bool | str = False

    def kwargs(self, log_every_n_steps: int = 10) -> dict[str, Any]:
        """The Trainer keywords; ``log_every_n_steps`` is the stage's cadence, used when
        the field is None."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision,
            "log_every_n_steps": (log_every_n_steps if self.log_every_n_steps is None
                                  else self.log_every_n_steps),
            "enable_progress_bar": self.enable_progress_bar,
            "deterministic": self.deterministic,
        }


def build_datamodule(cfg: DataConfig, setup: str | None = None):
    """A :class:`~lightning_distill.data.RealDataModule` for ``cfg``; with ``setup`` (a
    Lightning stage name: "fit", "test"), also ready to use: ``prepare_data()`` on global
    rank 0 (downloads when ``cfg.kwargs`` has ``download: true``), then ``setup(setup)``.

    Under DDP started by Lightning the other ranks start inside ``Trainer.fit``, after
    this ran on rank 0; launchers that start all ranks at once (torchrun, SLURM) need the
    data on disk first (run one process with ``download: true`` once).
    """
    from pytorch_lightning.utilities import rank_zero_only

    from .data.datamodule import RealDataModule

    dm = RealDataModule(
        name=cfg.name,
        root=cfg.root,
        batch_size=cfg.batch_size,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        zca=cfg.zca,
        zca_regularization=cfg.zca_regularization,
        num_workers=cfg.num_workers,
        dataset_kwargs=dict(cfg.kwargs),
        loader=cfg.loader,
    )
    if setup is not None:
        if rank_zero_only.rank == 0:
            dm.prepare_data()
        dm.setup(setup)
    return dm
