"""``SyntheticDataModule``: train on a synthetic set, validate and test on the real data.

The LightningDataModule of the evaluation protocol (docs/method.md, 'Evaluation
protocol'): its training data is a :class:`~lightning_distill.data.SyntheticSet` (an
object, or the path of a file written by :meth:`SyntheticSet.save`), its validation and
test data are the validation and test splits of a
:class:`~lightning_distill.data.RealDataModule`, built from plain arguments (the keys
of the stages' ``data:`` section) or given as an object. Every argument is a plain type
(or a class a YAML ``class_path`` names), so a stock ``LightningCLI`` configures it.

Example::

    import pytorch_lightning as pl
    from lightning_distill import EvalModule, SyntheticDataModule

    dm = SyntheticDataModule("runs/digits_ipc10/best.pt", name="digits")
    module = EvalModule("runs/digits_ipc10/best.pt", model="ConvNet", epochs=300)
    trainer = pl.Trainer(max_epochs=module.epochs, logger=False)
    trainer.fit(module, datamodule=dm)      # trains on the set, validates on the real split
    trainer.test(module, datamodule=dm)     # test/acc, test/acc_class/<k>

``setup()`` refuses a set that does not fit the real data: another data set
(``meta["dataset"]``), other channels, image size or number of classes, or another
input space (:meth:`InputSpace.matches`: normalisation statistics, ZCA fingerprint).

The training batches: the batch order and size belong to the module that trains (an
:class:`~lightning_distill.modules.EvalModule` draws run k's order from its own seeded
generator, which its checkpoints carry). :meth:`SyntheticDataModule.train_dataloader`
therefore asks the Trainer's LightningModule for the loader, calling its
``synthetic_train_dataloader(images, labels)`` with the set's tensors;
:class:`EvalModule` builds it with :func:`synthetic_train_loader`, the one function
that also builds its own ``train_dataloader``, so both paths yield the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..errors import InputError, InputTypeError, StateError
from ..protocols import SyntheticTrainLoader
from .datamodule import RealDataModule, TensorBatchLoader
from .input_space import InputSpace
from .splits import images_view, split_labels
from .synthetic import SyntheticSet, check_eval_data

__all__ = ["SyntheticDataModule", "synthetic_train_loader"]


class _EpochPermutationSampler(Sampler[int]):
    """One ``torch.randperm(n, generator)`` per epoch: the plain loop's batch order."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.n


class _GroupEpochLoader:
    """Per-member batches of a synthetic set: each epoch, member k's order is one
    ``torch.randperm(n, generator_k)`` (what member k's plain loop draws); batch b is
    ``(images[order_k[b]], labels[order_k[b]])`` stacked over the members,
    ``[K, B, ...]``."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int,
                 generators: Sequence[torch.Generator]) -> None:
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.generators = list(generators)

    def __len__(self) -> int:
        return -(-int(self.images.shape[0]) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = int(self.images.shape[0])
        perm = torch.stack([torch.randperm(n, generator=g) for g in self.generators])
        for i in range(0, n, self.batch_size):
            idx = perm[:, i : i + self.batch_size]
            yield self.images[idx], self.labels[idx]


def synthetic_train_loader(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generators: Sequence[torch.Generator],
    stacked: bool = False,
) -> DataLoader | _GroupEpochLoader:
    """The training batches of the evaluation protocol on a synthetic set.

    Every epoch (every ``iter()``) each run reshuffles with ONE
    ``torch.randperm(n, generator=generators[k])``, the draw of the plain loop
    (:func:`~lightning_distill.functional.train_and_evaluate`), and serves consecutive
    slices of ``batch_size`` (last batch partial). ``stacked=False``: one run (one
    generator), a ``DataLoader`` of ``(images [B, ...], labels [B])``; ``stacked=True``:
    K runs trained as one vectorised model, batches ``(images [K, B, ...], labels [K, B])``,
    run k's part in run k's order. The tensors are moved to the CPU (the Trainer moves
    each batch to its device); the generators are used, not copied, so the order goes
    on from epoch to epoch and resumes with their state.
    """
    gens = list(generators)
    if not gens:
        raise InputError("synthetic_train_loader: need at least one generator")
    if int(batch_size) < 1:
        raise InputError(f"synthetic_train_loader: batch_size must be >= 1, got {batch_size}")
    x, y = images.detach().cpu(), labels.detach().cpu()
    if stacked:
        return _GroupEpochLoader(x, y, int(batch_size), gens)
    if len(gens) != 1:
        raise InputError(f"synthetic_train_loader: {len(gens)} generators for one run; pass "
                         "stacked=True for a group of runs")
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=int(batch_size),
                      sampler=_EpochPermutationSampler(len(ds), gens[0]))


#: the plain arguments that describe the real data, with their defaults
_REAL_DEFAULTS: dict[str, Any] = {
    "name": None, "root": None, "batch_size": 1024, "val_fraction": 0.1, "split_seed": 0,
    "zca": False, "zca_regularization": 0.1, "num_workers": 0, "loader": "batched",
    "dataset_kwargs": None,
}


class SyntheticDataModule(pl.LightningDataModule):
    """Training data: a synthetic set; validation / test data: a real data set's splits.

    Args:
        synthetic: the set, or the path of its ``.pt`` file (:meth:`SyntheticSet.load`,
            which refuses NaN / inf images or labels).
        name: the registered real data set (default: the set's ``meta["dataset"]``).
        root, val_fraction, zca, zca_regularization, num_workers, loader,
            dataset_kwargs: as :class:`RealDataModule` (the stages' ``data:`` keys; the
            ZCA is fitted on the real training part, as for the distillation).
        batch_size: batch size of the validation and test loaders (1024, the test batch
            size of :func:`~lightning_distill.modules.evaluate_synthetic`); the
            training batches are the module's (see the module docstring).
        split_seed: seed of the real validation split (``RealDataModule(split_seed=...)``).
        real: a :class:`RealDataModule` to take the validation and test splits from,
            instead of the plain arguments above (which must then stay at their
            defaults).

    After ``setup()``: ``real`` (the RealDataModule, set up), ``val_set`` / ``test_set``
    (its splits), ``input_space``, ``num_classes``, ``channels``, ``image_size``;
    ``synthetic`` from the start.
    """

    def __init__(
        self,
        synthetic: str | os.PathLike | SyntheticSet,
        name: str | None = None,
        root: str | None = None,
        batch_size: int = 1024,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        zca: bool = False,
        zca_regularization: float = 0.1,
        num_workers: int = 0,
        loader: str = "batched",
        dataset_kwargs: dict[str, Any] | None = None,
        real: RealDataModule | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["synthetic", "real"])
        synthetic, path = SyntheticSet.from_arg(synthetic, "SyntheticDataModule")
        if path is not None:
            self.hparams["synthetic"] = path
        where = synthetic.meta.get("path") or "the synthetic set"
        synthetic.check_finite(where)
        self.synthetic = synthetic
        plain = dict(name=name, root=root, batch_size=batch_size, val_fraction=val_fraction,
                     split_seed=split_seed, zca=zca, zca_regularization=zca_regularization,
                     num_workers=num_workers, loader=loader, dataset_kwargs=dataset_kwargs)
        if real is not None:
            if not isinstance(real, RealDataModule):
                raise InputTypeError(f"SyntheticDataModule: real must be a RealDataModule, got "
                                f"{type(real).__name__}")
            given = sorted(k for k, v in plain.items() if v != _REAL_DEFAULTS[k])
            if given:
                raise InputError(
                    f"SyntheticDataModule: got real=RealDataModule(...) and {given}; the real "
                    "data comes from one of them: set those on the RealDataModule instead"
                )
        else:
            if name is None:
                name = synthetic.meta.get("dataset")
                if name is None:
                    raise InputError(
                        f"SyntheticDataModule: {where} records no data set (meta['dataset']); "
                        "pass name=... (the data set it was distilled from)"
                    )
            real = RealDataModule(
                str(name), root=root, batch_size=batch_size, val_fraction=val_fraction,
                split_seed=split_seed, zca=zca, zca_regularization=zca_regularization,
                num_workers=num_workers, dataset_kwargs=dataset_kwargs, loader=loader,
            )
        source = synthetic.meta.get("dataset")
        if source is not None and str(source) != real.name:
            raise InputError(
                f"SyntheticDataModule: {where} was distilled from the data set {source!r}, but "
                f"the real data is {real.name!r}; pass name={str(source)!r} (with the same "
                "normalisation / ZCA settings as the distillation)"
            )
        self.real = real
        self._checked = False

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        """The real data set's download, when its ``dataset_kwargs`` ask for it."""
        self.real.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up the real data and check the synthetic set against it (once)."""
        self.real.setup(stage)
        if self._checked:
            return
        space = self.real.input_space
        for what, ds in (("validation", self.real.val_set), ("test", self.real.test_set)):
            assert ds is not None
            # shapes and labels only: a streamed split's images are not read
            x, y = images_view(ds), split_labels(ds)
            check_eval_data(self.synthetic, x, y, "SyntheticDataModule", what, space,
                            hint="; use the data set the set was distilled from",
                            num_classes=self.real.num_classes)
        self._checked = True

    # ------------------------------------------------------------------ facts
    @property
    def val_set(self) -> TensorDataset | None:
        return self.real.val_set

    @property
    def test_set(self) -> TensorDataset | None:
        return self.real.test_set

    @property
    def input_space(self) -> InputSpace:
        return self.real.input_space

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def channels(self) -> int:
        return self.real.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.real.image_size

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> Any:
        """The synthetic set's training batches, built by the Trainer's LightningModule:
        ``module.synthetic_train_dataloader(images, labels)`` (see the module docstring)."""
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if not isinstance(module, SyntheticTrainLoader):
            raise StateError(
                "SyntheticDataModule.train_dataloader: the batch order and size belong to the "
                "module that trains, and "
                + ("no Trainer is attached" if module is None
                   else f"{type(module).__name__} has no synthetic_train_dataloader(images, "
                        "labels)")
                + "; train with lightning_distill.EvalModule, or build the loader with "
                "lightning_distill.data.synthetic_train_loader"
            )
        return module.synthetic_train_dataloader(self.synthetic.images, self.synthetic.labels)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The real data module's hook: a streamed validation / test split's batches
        (uint8 codes) become input-space images on the device; the synthetic set's
        training batches and a held split's pass unchanged."""
        return self.real.on_after_batch_transfer(batch, dataloader_idx)

    def val_dataloader(self) -> DataLoader | TensorBatchLoader | list:
        """The real validation split (no loader when ``val_fraction`` is 0)."""
        if self.real.val_set is not None and len(self.real.val_set) == 0:
            return []
        return self.real.val_dataloader()

    def test_dataloader(self) -> DataLoader | TensorBatchLoader:
        """The real test split."""
        return self.real.test_dataloader()
