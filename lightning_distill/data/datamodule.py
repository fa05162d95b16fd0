"""``RealDataModule``: a real data set in the model's input space, as a LightningDataModule.

``setup()`` loads the data set (:func:`~lightning_distill.data.datasets.get_dataset`),
holds out a seeded, class-stratified validation split of the training set, and maps every
split into the input space the experts, the distillation and the evaluation all share
(REFERENCE section 2):

- ``zca=False``: ``x -> (x - mean) / std`` per channel, with the data set's constants;
- ``zca=True``: ZCA whitening of the [0, 1] images (no mean/std normalisation), fitted on
  the training part only (not validation, not test) and applied to every split.

Example::

    dm = RealDataModule("cifar10", zca=True, batch_size=256)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))        # whitened images, labels
    grid = dm.from_input_space(x[:16]).clamp(0, 1)  # back to [0, 1] for display
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.data.datasets import RealDataset, get_dataset

__all__ = ["RealDataModule"]

_CHUNK = 4096


class RealDataModule(pl.LightningDataModule):
    """A real data set split into train / val / test, transformed into model input space.

    Args:
        name: registered data set name (``list_datasets()``).
        root: data directory (default: ``$LIGHTNING_DISTILL_DATA`` or
            ``~/.cache/lightning_distill/data``).
        batch_size: batch size of all three dataloaders.
        val_fraction: fraction of each class of the training set held out for validation.
        seed: seed of the validation split and of the training shuffle order.
        shuffle_seed: seed of the training shuffle order alone (default: ``seed``); the
            experts stage sets it per expert so each expert sees its own data order
            while the split stays fixed.
        zca: ZCA-whiten instead of mean/std normalisation.
        zca_regularization: eigenvalue shift of the ZCA transform (0.1 in MTT/DATM).
        num_workers: dataloader worker processes.
        dataset_kwargs: extra keywords for the data set loader (``download``,
            ``image_size``, ...).

    After ``setup()``: ``real`` (the :class:`RealDataset`), ``train_idx`` / ``val_idx``
    (indices into ``real``'s training split), ``train_set`` / ``val_set`` / ``test_set``
    (CPU :class:`TensorDataset` of float32 transformed images and int64 labels), ``zca``
    (the fitted transform or ``None``) and ``input_space`` (metadata dict).
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        zca: bool = False,
        zca_regularization: float = 0.1,
        num_workers: int = 0,
        dataset_kwargs: dict[str, Any] | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.name = name
        self.root = root
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.use_zca = bool(zca)
        self.zca_regularization = float(zca_regularization)
        self.num_workers = int(num_workers)
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.real: RealDataset | None = None
        self.zca: Any = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        """Download once (rank 0) when ``dataset_kwargs`` asks for it."""
        if self.dataset_kwargs.get("download"):
            get_dataset(self.name, self.root, **self.dataset_kwargs)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and transform all splits (runs once; later calls do nothing)."""
        if self.real is not None:
            return
        kw = {k: v for k, v in self.dataset_kwargs.items() if k != "download"}
        real = get_dataset(self.name, self.root, **kw)
        train_idx, val_idx = real.split_validation(self.val_fraction, self.seed)
        if self.use_zca:
            from lightning_distill.data.zca import ZCA

            self.zca = ZCA(self.zca_regularization).fit(real.images("train", train_idx))
        self.real = real
        self.train_idx, self.val_idx = train_idx, val_idx
        self.train_set = self._transformed("train", train_idx)
        self.val_set = self._transformed("train", val_idx)
        self.test_set = self._transformed("test", torch.arange(real.test_data.shape[0]))

    def _transformed(self, split: str, index: Tensor) -> TensorDataset:
        real = self._real()
        x = torch.empty((index.numel(), real.channels, *real.image_size), dtype=torch.float32)
        for i in range(0, index.numel(), _CHUNK):
            x[i : i + _CHUNK] = self.to_input_space(real.images(split, index[i : i + _CHUNK]))
        labels = real.train_labels if split == "train" else real.test_labels
        return TensorDataset(x, labels[index].clone())

    def _real(self) -> RealDataset:
        if self.real is None:
            raise RuntimeError("RealDataModule: call setup() first")
        return self.real

    # ---------------------------------------------------------------- input space
    def to_input_space(self, x01: Tensor) -> Tensor:
        """[0, 1] images -> model input: ``zca.transform(x)`` or ``(x - mean) / std``."""
        if self.use_zca:
            if self.zca is None:
                raise RuntimeError("RealDataModule: call setup() first (ZCA is not fitted)")
            return self.zca.transform(x01)
        return self._real().normalize(x01)

    def from_input_space(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`to_input_space` (inverse ZCA or ``x * std + mean``), for display."""
        if self.use_zca:
            if self.zca is None:
                raise RuntimeError("RealDataModule: call setup() first (ZCA is not fitted)")
            return self.zca.inverse(x)
        return self._real().denormalize(x)

    @property
    def input_space(self) -> dict[str, Any]:
        """Identity of the input space, for metadata of trajectory stores and synthetic sets."""
        real = self._real()
        zca = self.use_zca
        return {
            "dataset": real.name,
            "normalization": "zca" if zca else "meanstd",
            "mean": None if zca else list(real.mean),
            "std": None if zca else list(real.std),
            "zca_fingerprint": self.zca.fingerprint if zca else None,
            "zca_regularization": self.zca_regularization if zca else None,
        }

    # ----------------------------------------------------------------- shape facts
    @property
    def num_classes(self) -> int:
        return self._real().num_classes

    @property
    def channels(self) -> int:
        return self._real().channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self._real().image_size

    def images_of_class(
        self, c: int, n: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` random training-part images of class ``c`` (validation excluded), in input
        space: ``train_set`` rows ``randperm(count, generator)[:n]`` of that class
        (all of them, in order, when ``n`` is None)."""
        real = self._real()
        assert self.train_set is not None
        x, y = self.train_set.tensors
        idx = torch.nonzero(y == real._check_class(c)).flatten()
        if n is not None:
            if n > idx.numel():
                raise ValueError(
                    f"{real.name}: asked for {n} images of class {c} but the training part "
                    f"has only {idx.numel()}"
                )
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return x[idx]

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("RealDataModule: call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(
                self.seed if self.shuffle_seed is None else self.shuffle_seed
            )
            if shuffle
            else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order is seeded by ``shuffle_seed`` (or ``seed``)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
