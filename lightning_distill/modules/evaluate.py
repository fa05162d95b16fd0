"""EvalModule: train a fresh network on a synthetic set and test it (docs/method.md, 'Evaluation
protocol').

The protocol every published number uses: SGD (momentum 0.9, weight decay 5e-4), lr =
the set's learned alpha, ``epochs`` epochs (1000) of shuffled minibatches with DSA on
every batch, the lr multiplied by 0.1 at the start of epoch ``epochs // 2`` with the
momentum buffers reset (the reference re-creates the optimizer), soft cross-entropy for
soft labels, one test at the end on the real test set in the SAME input space.

Example::

    import pytorch_lightning as pl
    from lightning_distill import EvalModule

    module = EvalModule("runs/cifar10_ipc10/best.pt", model="ConvNet", epochs=1000)
    trainer = pl.Trainer(max_epochs=module.epochs, logger=False)
    trainer.fit(module)                                  # trains on the synthetic set
    trainer.test(module, dataloaders=test_loader)        # logs test/acc
    print(module.test_accuracy)

The training data always comes from the module (its ``train_dataloader``); pass
validation data as ``trainer.fit(module, val_dataloaders=...)`` and test data to
``trainer.test(module, dataloaders=...)`` or ``trainer.test(module, datamodule=dm)``.
For K networks and several architectures use :func:`evaluate_synthetic`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..data.augment import ResumableGenerator, protocol_dsa
from ..data.synthetic import SyntheticSet
from ..functional.batched import StackedNetworks, augment_members, chunks, member_losses
from ..functional.evaluation import (
    EvalProtocol,
    lr_at_epoch,
    resolve_decay_epoch,
    run_seeds,
    seeded_model,
    summarize,
)
from ..functional.losses import classification_loss

__all__ = ["EvalModule", "EvalProtocol", "evaluate_synthetic"]


def check_eval_data(
    synthetic: SyntheticSet,
    images: Tensor,
    labels: Tensor,
    where: str,
    what: str,
    input_space: Mapping[str, Any] | None = None,
    hint: str = "",
) -> None:
    """Raise ``ValueError`` unless ``images``/``labels`` can test a network trained on
    ``synthetic``: same channels, image size (and input space, when given) and no label
    beyond the set's classes. ``where``/``what`` name the caller and the data in messages."""
    synthetic.check_compatible(
        channels=images.shape[1], image_size=tuple(images.shape[2:]),
        num_classes=synthetic.num_classes, input_space=input_space,
    )
    if labels.numel() and int(labels.max()) >= synthetic.num_classes:
        raise ValueError(
            f"{where}: {what} labels reach class {int(labels.max())} but the synthetic set "
            f"has {synthetic.num_classes} classes{hint}"
        )


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


class EvalModule(pl.LightningModule):
    """Train fresh ``build_model`` networks on a :class:`SyntheticSet` (docs/method.md,
    'Evaluation protocol').

    Args:
        synthetic: the set, or the path of a file written by :meth:`SyntheticSet.save`.
        model, model_kwargs: ``build_model`` name and extra keywords.
        protocol: the training settings (:class:`EvalProtocol`: epochs, batch size, lr,
            momentum, weight decay, lr drop epoch, DSA); the Trainer's ``max_epochs``
            must equal ``protocol.epochs``. ``lr=None`` uses ``synthetic.lr``.
        seed: one run seed, or several: then the runs train as ONE vectorised model
            (:class:`~lightning_distill.functional.batched.StackedNetworks`), run k with
            its own init, batch order and DSA draws from ``seed[k]`` (:func:`run_seeds`),
            exactly as in :func:`~lightning_distill.functional.train_and_evaluate` via
            :func:`evaluate_synthetic`. (``protocol.group_size`` is
            :func:`evaluate_synthetic`'s business: this module trains the seeds it gets.)
        **overrides: :class:`EvalProtocol` fields (``epochs=...``, ``batch_size=...``),
            applied on top of ``protocol``.

    After ``trainer.test``: ``test_accuracies`` (one per run) and ``test_accuracy``
    (the run's, or the mean over the runs); ``val_accuracy`` likewise.
    """

    def __init__(
        self,
        synthetic: SyntheticSet | str | os.PathLike,
        model: str = "ConvNet",
        model_kwargs: dict[str, Any] | None = None,
        protocol: EvalProtocol | None = None,
        seed: int | Sequence[int] = 0,
        **overrides: Any,
    ) -> None:
        super().__init__()
        protocol = EvalProtocol.resolve(protocol, overrides, "EvalModule")
        seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
        if not seeds:
            raise ValueError("EvalModule: seed must be an int or a non-empty list of ints")
        self.save_hyperparameters({
            "model": model, "model_kwargs": dict(model_kwargs or {}),
            "seed": seed if isinstance(seed, int) else seeds, **protocol.as_kwargs()})
        if isinstance(synthetic, (str, os.PathLike)):
            self.hparams["synthetic"] = os.fspath(synthetic)
            synthetic = SyntheticSet.load(synthetic)
        if not isinstance(synthetic, SyntheticSet):
            raise TypeError(
                f"EvalModule: synthetic must be a SyntheticSet or a file path, got "
                f"{type(synthetic).__name__}"
            )
        self.protocol = protocol
        self.synthetic = synthetic.detach_clone()
        self.epochs = int(protocol.epochs)
        self.eval_lr = float(synthetic.lr if protocol.lr is None else protocol.lr)
        if not self.eval_lr > 0:
            raise ValueError(f"EvalModule: lr must be > 0, got {self.eval_lr}")
        self.decay_epoch = resolve_decay_epoch(self.epochs, protocol.lr_decay_epoch)
        self.seeds = seeds
        self.grouped = not isinstance(seed, int)
        streams = [run_seeds(s) for s in seeds]
        nets = [seeded_model(
            model, synthetic.channels, synthetic.num_classes, synthetic.image_size,
            seed=init, **(model_kwargs or {})) for init, _, _ in streams]
        self.net = StackedNetworks(nets) if self.grouped else nets[0]
        self.augment = protocol_dsa(protocol, synthetic.meta.get("dataset"))
        self._shuffle_generators = [torch.Generator().manual_seed(sh) for _, sh, _ in streams]
        self._dsa_streams = [ResumableGenerator(d) for _, _, d in streams]
        self._shuffle_seed, self._dsa_seed = streams[0][1], streams[0][2]
        self._shuffle_generator = self._shuffle_generators[0]
        self._dsa_stream = self._dsa_streams[0]
        self._counts: dict[str, list[Tensor]] = {}
        self.val_accuracy: float | None = None
        self.test_accuracy: float | None = None
        self.val_accuracies: list[float] | None = None
        self.test_accuracies: list[float] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits; for a group, every run's on the same batch: ``[K, B, classes]``."""
        return self.net.forward_shared(x) if self.grouped else self.net(x)

    # -- randomness -------------------------------------------------------------------
    @property
    def dsa_generator(self) -> torch.Generator:
        """The (first run's) DSA generator, seeded from ``run_seeds(seed)[2]``; on the CPU
        whatever the module's device (:class:`ResumableGenerator`), as in
        :meth:`EvalProtocol.train_runs`, so a checkpoint written on a GPU resumes on a CPU
        and vice versa."""
        return self._dsa_stream.generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.grouped:
            checkpoint["eval_generators"] = {
                "dsa": self._dsa_stream.state(),
                "shuffle": self._shuffle_generator.get_state(),
            }
            return
        checkpoint["eval_generators"] = {
            "dsa": [s.state() for s in self._dsa_streams],
            "shuffle": [g.get_state() for g in self._shuffle_generators],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("eval_generators") or {}
        shuffle, dsa = state.get("shuffle"), state.get("dsa")
        if not self.grouped:
            shuffle, dsa = [shuffle], [dsa]
        for g, st in zip(self._shuffle_generators, shuffle or [], strict=False):
            if st is not None:
                g.set_state(st.to("cpu", torch.uint8))
        for stream, st in zip(self._dsa_streams, dsa or [None] * len(self.seeds), strict=False):
            stream.restore(st)

    # -- data -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader | _GroupEpochLoader:
        """The synthetic set, reshuffled every epoch (one ``randperm`` per epoch and run)."""
        s = self.synthetic
        if self.grouped:
            return _GroupEpochLoader(s.images.cpu(), s.labels.cpu(), self.protocol.batch_size,
                                     self._shuffle_generators)
        ds = TensorDataset(s.images.cpu(), s.labels.cpu())
        sampler = _EpochPermutationSampler(len(ds), self._shuffle_generator)
        return DataLoader(ds, batch_size=int(self.protocol.batch_size), sampler=sampler)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and is_overridden("train_dataloader", dm):
            raise ValueError(
                "EvalModule trains on its synthetic set, but trainer.fit got a datamodule "
                f"({type(dm).__name__}) whose train_dataloader would replace it; call "
                "trainer.fit(module, val_dataloaders=dm.val_dataloader()) instead and "
                "trainer.test(module, datamodule=dm) afterwards"
            )
        if self.trainer.max_epochs != self.epochs:
            raise ValueError(
                f"EvalModule(epochs={self.epochs}) needs Trainer(max_epochs={self.epochs}), "
                f"got max_epochs={self.trainer.max_epochs}: the lr schedule (x0.1 at epoch "
                f"{self.decay_epoch}) is defined by the module's epochs"
            )

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        p = self.protocol
        return torch.optim.SGD(
            self.net.parameters(), lr=self.eval_lr, momentum=p.momentum,
            weight_decay=p.weight_decay,
        )

    def on_train_epoch_start(self) -> None:
        """Exact schedule: lr for epoch e is ``lr_at_epoch``; at the decay epoch the SGD
        state (momentum buffers) is cleared, i.e. the optimizer is re-created in place."""
        opt = self.optimizers(use_pl_optimizer=False)
        epoch = self.current_epoch
        for group in opt.param_groups:
            group["lr"] = lr_at_epoch(self.eval_lr, epoch, self.decay_epoch)
        if self.decay_epoch is not None and epoch == self.decay_epoch:
            opt.state.clear()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.grouped:
            if self.augment is not None:
                x = augment_members(self.augment, x, [s.generator for s in self._dsa_streams])
            losses = member_losses(self.net(x), y)
            self.log("train/loss", losses.detach().mean(), on_step=False, on_epoch=True,
                     batch_size=x.shape[1])
            return losses.sum()
        if self.augment is not None:
            x = self.augment(x, generator=self.dsa_generator)
        loss = classification_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    # -- validation / test: exact correct / total counts -------------------------------
    def _count(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        if not self.grouped:
            logits = logits.unsqueeze(0)
        k = logits.shape[0]
        correct = (logits.argmax(2) == y.unsqueeze(0)).sum(dim=1).double()
        c = self._counts.setdefault(
            stage, [torch.zeros(k, dtype=torch.float64, device=self.device), 0])
        c[0] = c[0] + correct
        c[1] += int(y.shape[0])
        loss = F.cross_entropy(logits.flatten(0, 1), y.long().repeat(k))
        self.log(f"{stage}/loss", loss, batch_size=y.shape[0], sync_dist=True)

    def _finish(self, stage: str) -> list[float] | None:
        k = len(self.seeds)
        correct, total = self._counts.pop(
            stage, [torch.zeros(k, dtype=torch.float64, device=self.device), 0])
        counts = torch.cat([correct, torch.tensor([float(total)], dtype=torch.float64,
                                                   device=self.device)])
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[-1] <= 0:
            return None
        n = int(counts[-1].item())
        accs = [int(round(c)) / n for c in counts[:-1].tolist()]
        self.log(f"{stage}/acc", sum(accs) / len(accs), prog_bar=True)
        return accs

    def on_validation_epoch_start(self) -> None:
        self._counts.pop("val", None)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._count(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_accuracies = self._finish("val")
        self.val_accuracy = _mean(self.val_accuracies)

    def on_test_epoch_start(self) -> None:
        self._counts.pop("test", None)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._count(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_accuracies = self._finish("test")
        self.test_accuracy = _mean(self.test_accuracies)


def _mean(values: list[float] | None) -> float | None:
    return None if values is None else (values[0] if len(values) == 1
                                        else sum(values) / len(values))


def trainer_device_args(device: torch.device) -> dict[str, Any]:
    """``accelerator`` / ``devices`` keywords for a one-device Trainer on ``device``
    (``cuda:1`` -> ``accelerator="gpu", devices=[1]``: ``devices=1`` would mean cuda:0)."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def _quiet_trainer(epochs: int, device: torch.device) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, **trainer_device_args(device), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def evaluate_synthetic(
    synthetic: SyntheticSet | str | os.PathLike,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    models: Sequence[str] = ("ConvNet",),
    runs: int = 5,
    seed: int = 0,
    protocol: EvalProtocol | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    test_batch_size: int = 1024,
    input_space: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    use_trainer: bool = False,
    train_sets: Sequence[tuple[Tensor, Tensor]] | None = None,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Train ``runs`` fresh networks per architecture on ``synthetic`` and test them.

    Run ``r`` uses seed ``seed + r`` (network init, batch order and DSA through
    :func:`run_seeds`), so architectures and baselines see paired seeds. The runs train
    ``protocol.group_size`` at a time as one vectorised model
    (:func:`~lightning_distill.functional.train_and_evaluate_group`; group size 1: one
    at a time). The plain loop (default, fast) and ``use_trainer=True``
    (:class:`EvalModule` + ``Trainer``, one module per group) give the same accuracies
    for the same seed.

    ``protocol``: the training settings (:class:`EvalProtocol`, default the published
    one); keyword ``overrides`` (``epochs=...``, ``batch_size=...``, ``lr=...``,
    ``group_size=...``) replace its fields. ``test_images`` must already be in the
    synthetic set's input space (normalised or ZCA whitened as during distillation):
    nothing is transformed here. Pass the data's ``input_space`` dict to have it checked
    against ``synthetic.meta["input_space"]``. ``model_kwargs`` maps a model name to
    extra ``build_model`` keywords. ``train_sets``: one ``(images, labels)`` per run
    that replaces ``synthetic``'s tensors for that run (the random-real baseline's
    subsets; ``synthetic`` still gives the lr, metadata and shapes).

    Returns:
        ``{model: {"accs": [...], "mean": m, "std": s}}`` with :func:`summarize` (population
        std).
    """
    protocol = EvalProtocol.resolve(protocol, overrides, "evaluate_synthetic")
    if isinstance(synthetic, (str, os.PathLike)):
        synthetic = SyntheticSet.load(synthetic)
    if runs < 1:
        raise ValueError(f"evaluate_synthetic: runs must be >= 1, got {runs}")
    if test_images.dim() != 4:
        raise ValueError(
            f"evaluate_synthetic: test_images must be [N, C, H, W], got {tuple(test_images.shape)}"
        )
    check_eval_data(
        synthetic, test_images, test_labels, "evaluate_synthetic", "test", input_space,
        hint="; use the matching data set",
    )
    if train_sets is not None:
        if len(train_sets) != runs:
            raise ValueError(f"evaluate_synthetic: {len(train_sets)} train_sets for {runs} runs")
        if use_trainer:
            raise ValueError("evaluate_synthetic: train_sets needs the plain loop "
                             "(use_trainer=False)")
    dev = torch.device(device) if device is not None else synthetic.images.device
    seeds = [int(seed) + r for r in range(runs)]
    augment = protocol_dsa(protocol, synthetic.meta.get("dataset"))
    if train_sets is None:
        images: Tensor | list[Tensor] = synthetic.images
        labels: Tensor | list[Tensor] = synthetic.labels
    else:
        images = [x for x, _ in train_sets]
        labels = [y for _, y in train_sets]
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        mkw = dict((model_kwargs or {}).get(name, {}))
        if use_trainer:
            accs: list[float] = []
            for part in chunks(seeds, protocol.group_size):
                accs.extend(_run_with_trainer(
                    synthetic, name, mkw, part, protocol, test_images, test_labels,
                    test_batch_size, dev,
                ))
        else:
            accs = protocol.train_runs(
                name, mkw, seeds, images, labels, set_lr=synthetic.lr,
                num_classes=synthetic.num_classes, test_images=test_images,
                test_labels=test_labels, test_batch_size=test_batch_size, device=dev,
                augment=augment,
            )
        mean, std = summarize(accs)
        results[name] = {"accs": accs, "mean": mean, "std": std}
    return results


def _run_with_trainer(
    synthetic: SyntheticSet, name: str, mkw: dict, seeds: Sequence[int], protocol: EvalProtocol,
    test_images: Tensor, test_labels: Tensor, test_batch_size: int, dev: torch.device,
) -> list[float]:
    seed: int | list[int] = int(seeds[0]) if len(seeds) == 1 else [int(s) for s in seeds]
    module = EvalModule(synthetic, model=name, model_kwargs=mkw, protocol=protocol, seed=seed)
    test_loader = DataLoader(
        TensorDataset(test_images.detach().cpu(), test_labels.detach().cpu().long()),
        batch_size=test_batch_size,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer = _quiet_trainer(module.epochs, dev)
        trainer.fit(module)
        trainer.test(module, dataloaders=test_loader, verbose=False)
    assert module.test_accuracies is not None
    return list(module.test_accuracies)
