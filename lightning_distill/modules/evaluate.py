"""EvalModule: train a fresh network on a synthetic set and test it (docs/method.md, 'Evaluation
protocol').

The protocol every published number uses: SGD (momentum 0.9, weight decay 5e-4), lr =
the set's learned alpha, ``epochs`` epochs (1000) of shuffled minibatches with DSA on
every batch, the lr multiplied by 0.1 at the start of epoch ``epochs // 2`` with the
momentum buffers reset (the reference re-creates the optimizer), soft cross-entropy for
soft labels, one test at the end on the real test set in the SAME input space.

Example, the plain Lightning way (a :class:`~lightning_distill.data.SyntheticDataModule`
serves the synthetic set for training and the real validation / test splits)::

    import pytorch_lightning as pl
    from lightning_distill import EvalModule, SyntheticDataModule

    module = EvalModule("runs/cifar10_ipc10/best.pt", model="ConvNet", epochs=1000)
    dm = SyntheticDataModule("runs/cifar10_ipc10/best.pt", name="cifar10", zca=True)
    trainer = pl.Trainer(max_epochs=module.epochs, logger=False)
    trainer.fit(module, datamodule=dm)       # trains on the set, val/acc on the real split
    trainer.test(module, datamodule=dm)      # test/acc, test/acc_class/<k>
    print(module.test_accuracy, module.test_class_accuracy)

Without a datamodule the training data comes from the module (its ``train_dataloader``,
the same batches); pass validation data as ``trainer.fit(module, val_dataloaders=...)``
and test data as ``trainer.test(module, dataloaders=...)``. For K networks and several
architectures use :func:`evaluate_synthetic` (the same accuracies for the same seeds).

Logged: ``train/loss``; ``val/loss``, ``val/acc``; ``test/loss``, ``test/acc`` and
``test/acc_class/<k>`` (the accuracy on the test images of class k, for each class with
test images). The accuracies are torchmetrics ``MulticlassAccuracy`` objects (one per
run; ``average=None`` for the per-class ones), so under DDP they count over every
rank's share of the data; for a group of runs the logged value is the mean over the
runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from ..data.augment import ResumableGenerator, protocol_dsa
from ..data.synthetic import SyntheticSet, check_eval_data
from ..data.synthetic_datamodule import SyntheticDataModule, synthetic_train_loader
from ..errors import InputError, StateError
from ..functional.batched import StackedNetworks, augment_members, chunks, member_losses
from ..functional.evaluation import (
    EvalProtocol,
    class_accuracies,
    lr_at_epoch,
    resolve_decay_epoch,
    run_seeds,
    seeded_model,
    summarize,
)
from ..functional.losses import classification_loss
from ._build import check_fit, cpu_float32

__all__ = ["EvalModule", "EvalProtocol", "check_eval_data", "evaluate_synthetic"]


class EvalModule(pl.LightningModule):
    """Train fresh ``build_model`` networks on a :class:`SyntheticSet` (docs/method.md,
    'Evaluation protocol').

    Args:
        synthetic: the set, or the path of a file written by :meth:`SyntheticSet.save`;
            None: the set of the Trainer's :class:`~lightning_distill.data.SyntheticDataModule`
            (bound in :meth:`configure_model`, so a LightningCLI config names it once).
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
        epochs: the protocol's epochs (``--model.epochs`` on a command line), over
            ``protocol``.
        **overrides: other :class:`EvalProtocol` fields (``batch_size=...``), applied on
            top of ``protocol``.

    ``hparams``: ``model``, ``model_kwargs``, ``seed`` and ``protocol`` (the resolved
    protocol's fields, nested, so that none of them clashes with a datamodule's
    hyperparameter of the same name in a logger).

    After ``trainer.test``: ``test_accuracies`` (one per run) and ``test_accuracy``
    (the run's, or the mean over the runs); ``val_accuracies`` / ``val_accuracy``
    likewise after each validation; ``test_class_accuracies`` (per run, one entry per
    class: the fraction of that class's test images classified right, None for a class
    without test images) and ``test_class_accuracy`` (the mean over the runs). These
    are exact fractions of the torchmetrics counts (summed over the DDP ranks), equal to
    :func:`evaluate_synthetic`'s; the logged values are the metrics' ``compute()``
    (float32).

    Training data: its own synthetic set (``train_dataloader``) or a
    :class:`~lightning_distill.data.SyntheticDataModule` over the same set, which asks
    :meth:`synthetic_train_dataloader` for the batches: either way the same loader.
    """

    def __init__(
        self,
        synthetic: SyntheticSet | str | os.PathLike | None = None,
        model: str = "ConvNet",
        model_kwargs: dict[str, Any] | None = None,
        protocol: EvalProtocol | None = None,
        seed: int | Sequence[int] = 0,
        epochs: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if epochs is not None:
            overrides = {**overrides, "epochs": epochs}
        protocol = EvalProtocol.resolve(protocol, overrides, "EvalModule")
        seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
        if not seeds:
            raise InputError("EvalModule: seed must be an int or a non-empty list of ints")
        # the protocol nested: its batch_size (the training batch) is not the
        # datamodule's (the test batch), and Lightning merges the two into one logger
        self.save_hyperparameters({
            "model": model, "model_kwargs": dict(model_kwargs or {}),
            "seed": seed if isinstance(seed, int) else seeds,
            "protocol": protocol.as_kwargs()})
        self.protocol = protocol
        self.epochs = int(protocol.epochs)
        self.decay_epoch = resolve_decay_epoch(self.epochs, protocol.lr_decay_epoch)
        self.seeds = seeds
        self.grouped = not isinstance(seed, int)
        self.synthetic: SyntheticSet | None = None
        self.net: nn.Module | None = None
        self.val_accuracy: float | None = None
        self.test_accuracy: float | None = None
        self.val_accuracies: list[float] | None = None
        self.test_accuracies: list[float] | None = None
        self.test_class_accuracies: list[list[float | None]] | None = None
        self.test_class_accuracy: list[float | None] | None = None
        if synthetic is not None:
            self.bind(synthetic)

    def bind(self, synthetic: SyntheticSet | str | os.PathLike) -> None:
        """Build the networks, generators and metrics for ``synthetic`` (its shapes, lr and
        data set). Done by the constructor when it gets a set; without one, by
        :meth:`configure_model` from the Trainer's SyntheticDataModule, so the set is
        given once (to the datamodule) under a LightningCLI."""
        if self.synthetic is not None:
            raise StateError("EvalModule: already bound to a synthetic set")
        synthetic, path = SyntheticSet.from_arg(synthetic, "EvalModule")
        if path is not None:
            self.hparams["synthetic"] = path
        synthetic.check_finite()
        protocol, seeds = self.protocol, self.seeds
        lr = float(synthetic.lr if protocol.lr is None else protocol.lr)
        if not lr > 0:
            raise InputError(f"EvalModule: lr must be > 0, got {lr}")
        self.synthetic = synthetic.detach_clone()
        self.eval_lr = lr
        streams = [run_seeds(s) for s in seeds]
        nets = [seeded_model(
            self.hparams.model, synthetic.channels, synthetic.num_classes,
            synthetic.image_size, seed=init, **self.hparams.model_kwargs)
            for init, _, _ in streams]
        self.net = StackedNetworks(nets) if self.grouped else nets[0]
        self.augment = protocol_dsa(protocol, synthetic.meta.get("dataset"))
        self._shuffle_generators = [torch.Generator().manual_seed(sh) for _, sh, _ in streams]
        self._dsa_streams = [ResumableGenerator(d) for _, _, d in streams]
        self._shuffle_seed, self._dsa_seed = streams[0][1], streams[0][2]
        self._shuffle_generator = self._shuffle_generators[0]
        self._dsa_stream = self._dsa_streams[0]
        k, c = len(seeds), synthetic.num_classes
        #: per-run accuracy metrics (torchmetrics; states not in the checkpoint)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(c, average="micro") for _ in range(k))
        self.test_acc = nn.ModuleList(MulticlassAccuracy(c, average="micro") for _ in range(k))
        self.test_acc_class = nn.ModuleList(MulticlassAccuracy(c, average=None)
                                            for _ in range(k))

    def configure_model(self) -> None:
        """Lightning's hook (after the datamodule's setup, before a checkpoint's weights
        are loaded): bind to ``trainer.datamodule.synthetic`` when the module got no set
        (on the CPU in float32, as eager construction: the same networks)."""
        if self.synthetic is not None:
            return
        try:
            dm = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer
            dm = None
        if not isinstance(dm, SyntheticDataModule):
            raise InputError(
                "EvalModule got no synthetic set: pass one (a SyntheticSet or a .pt path), or "
                "fit with datamodule=SyntheticDataModule(...), whose set it then trains on"
                f"{'' if dm is None else f' (the datamodule is a {type(dm).__name__})'}")
        with cpu_float32():
            self.bind(dm.synthetic)

    def _bound(self) -> SyntheticSet:
        if self.synthetic is None:
            raise StateError("EvalModule has no synthetic set yet: pass one to the "
                             "constructor or fit with a SyntheticDataModule")
        return self.synthetic

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
    def synthetic_train_dataloader(self, images: Tensor, labels: Tensor) -> Any:
        """The training batches of ``(images, labels)`` in this module's order: each epoch
        one ``randperm`` per run from the run's shuffle generator, ``batch_size`` slices
        (:func:`~lightning_distill.data.synthetic_train_loader`). Used by
        :meth:`train_dataloader` and by :class:`~lightning_distill.data.SyntheticDataModule`."""
        return synthetic_train_loader(images, labels, int(self.protocol.batch_size),
                                      self._shuffle_generators, stacked=self.grouped)

    def train_dataloader(self) -> Any:
        """The synthetic set, reshuffled every epoch (one ``randperm`` per epoch and run)."""
        syn = self._bound()
        return self.synthetic_train_dataloader(syn.images, syn.labels)

    def on_fit_start(self) -> None:
        check_fit(self)
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, SyntheticDataModule):
            self._check_same_set(dm.synthetic)
        elif dm is not None and is_overridden("train_dataloader", dm):
            raise InputError(
                "EvalModule trains on its synthetic set, but trainer.fit got a datamodule "
                f"({type(dm).__name__}) whose train_dataloader would replace it; use a "
                "SyntheticDataModule, or call trainer.fit(module, "
                "val_dataloaders=dm.val_dataloader()) and trainer.test(module, datamodule=dm)"
            )
        if self.trainer.max_epochs != self.epochs:
            raise InputError(
                f"EvalModule(epochs={self.epochs}) needs Trainer(max_epochs={self.epochs}), "
                f"got max_epochs={self.trainer.max_epochs}: the lr schedule (x0.1 at epoch "
                f"{self.decay_epoch}) is defined by the module's epochs"
            )

    def _check_same_set(self, other: SyntheticSet) -> None:
        """The datamodule's set must be the module's (the network, lr and DSA come from it)."""
        mine = self._bound()
        same = (
            other.images.shape == mine.images.shape and other.labels.shape == mine.labels.shape
            and other.labels.dtype == mine.labels.dtype and float(other.lr) == float(mine.lr)
            and torch.equal(other.images.detach().cpu(), mine.images.detach().cpu())
            and torch.equal(other.labels.detach().cpu(), mine.labels.detach().cpu())
        )
        if not same:
            raise InputError(
                "EvalModule: the SyntheticDataModule serves another synthetic set "
                f"({other.meta.get('path') or other!r}) than the module was built on "
                f"({mine.meta.get('path') or mine!r}); give both the same set (file)"
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

    # -- validation / test: torchmetrics accuracies, one metric per run ---------------
    def _update(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        if not self.grouped:
            logits = logits.unsqueeze(0)
        k = logits.shape[0]
        y = y.long()
        preds = logits.argmax(2)  # [K, B]
        for r in range(k):
            self._metrics(stage)[r].update(preds[r], y)
            if stage == "test":
                self.test_acc_class[r].update(preds[r], y)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(k))
        self.log(f"{stage}/loss", loss, batch_size=y.shape[0], sync_dist=True)

    def _metrics(self, stage: str) -> nn.ModuleList:
        return self.val_acc if stage == "val" else self.test_acc

    def _finish(self, stage: str) -> list[float] | None:
        """Per-run accuracies (exact fractions of the counts summed over the ranks), the
        mean over the runs logged as ``{stage}/acc``; for ``test`` also the per-class
        accuracies (``test/acc_class/<k>``). Resets the metrics."""
        metrics = list(self._metrics(stage))
        per_class = list(self.test_acc_class) if stage == "test" else []
        try:
            counts = [_synced_counts(m) for m in metrics]
            if int(counts[0][1].sum()) <= 0:
                return None
            accs = [int(tp.sum()) / int(total.sum()) for tp, total in counts]
            # compute() is already summed over the ranks: sync_dist only averages equal values
            self.log(f"{stage}/acc", torch.stack([m.compute() for m in metrics]).mean(),
                     prog_bar=True, sync_dist=True)
            if per_class:
                class_counts = [_synced_counts(m) for m in per_class]
                self.test_class_accuracies = [
                    class_accuracies(tp.tolist(), total.tolist()) for tp, total in class_counts]
                self.test_class_accuracy = _class_mean(self.test_class_accuracies)
                values = torch.stack([m.compute() for m in per_class]).mean(0)
                support = class_counts[0][1]
                self.log_dict({f"test/acc_class/{c}": values[c]
                               for c in range(values.numel()) if int(support[c]) > 0},
                              sync_dist=True)
            return accs
        finally:
            for m in metrics + per_class:
                m.reset()

    def on_validation_epoch_start(self) -> None:
        for m in self.val_acc:
            m.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_accuracies = self._finish("val")
        self.val_accuracy = _mean(self.val_accuracies)

    def on_test_epoch_start(self) -> None:
        for m in [*self.test_acc, *self.test_acc_class]:
            m.reset()
        self.test_class_accuracies = self.test_class_accuracy = None

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_accuracies = self._finish("test")
        self.test_accuracy = _mean(self.test_accuracies)


def _synced_counts(metric: Metric) -> tuple[Tensor, Tensor]:
    """``(tp, tp + fn)`` of a torchmetrics stat-scores metric (per class, or one entry for
    ``average="micro"``), summed over the processes under DDP (its ``sync_context``):
    correct and total counts, exact integers."""
    with metric.sync_context(should_sync=True, should_unsync=True):
        tp, fn = metric.tp.detach().clone(), metric.fn.detach().clone()
    return tp, tp + fn


def _class_mean(rows: list[list[float | None]]) -> list[float | None]:
    """Per-class mean over runs (None where a class has no test images)."""
    out: list[float | None] = []
    for col in zip(*rows, strict=True):
        vals = [v for v in col if v is not None]
        out.append(sum(vals) / len(vals) if len(vals) == len(col) else None)
    return out


def _mean(values: list[float] | None) -> float | None:
    return None if values is None else (values[0] if len(values) == 1
                                        else sum(values) / len(values))


class RowBatches:
    """``(images[i:i + b], labels[i:i + b])`` in order, for a row source ``images`` (a
    streamed split's :class:`~lightning_distill.data.splits.SplitImages`): the batches
    of ``DataLoader(TensorDataset(images, labels), batch_size=b)``, each read when it
    is served."""

    def __init__(self, images: Any, labels: Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)

    def __len__(self) -> int:
        return -(-int(self.images.shape[0]) // self.batch_size)

    def __iter__(self) -> Any:
        for i in range(0, int(self.images.shape[0]), self.batch_size):
            yield self.images[i : i + self.batch_size], self.labels[i : i + self.batch_size]


def trainer_device_args(device: torch.device) -> dict[str, Any]:
    """``accelerator`` / ``devices`` keywords for a one-device Trainer on ``device``
    (``cuda:1`` -> ``accelerator="gpu", devices=[1]``: ``devices=1`` would mean cuda:0)."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def _quiet_trainer(epochs: int, device: torch.device, precision: str | None = None
                   ) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, **trainer_device_args(device), logger=False,
        precision=precision or "32-true",
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
    on_progress: Callable[[float], None] | None = None,
    train_data: tuple[Any, Tensor] | None = None,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Train ``runs`` fresh networks per architecture on ``synthetic`` and test them
    (``on_progress(runs)``: the runs' worth of work done, after every epoch, or after
    each group with ``use_trainer``; for a progress bar).

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
    subsets; ``synthetic`` still gives the lr, metadata and shapes). ``train_data``: one
    ``(images, labels)`` that replaces ``synthetic``'s tensors for every run, ``images``
    a tensor or a row source read a batch at a time (the full-data baseline on a
    streamed split: :class:`~lightning_distill.data.splits.SplitImages`; the same
    accuracies as its tensor). ``test_images`` may likewise be a row source (a streamed
    test split), read ``test_batch_size`` rows at a time.

    Returns:
        ``{model: {"accs": [...], "mean": m, "std": s, "class_accs": [[...], ...],
        "class_mean": [...]}}``: the runs' test accuracies with :func:`summarize`
        (population std); per run the accuracy on each class's test images (None for a
        class without test images) and their per-class mean over the runs.
    """
    protocol = EvalProtocol.resolve(protocol, overrides, "evaluate_synthetic")
    if isinstance(synthetic, (str, os.PathLike)):
        synthetic = SyntheticSet.load(synthetic)
    if runs < 1:
        raise InputError(f"evaluate_synthetic: runs must be >= 1, got {runs}")
    if test_images.dim() != 4:
        raise InputError(
            f"evaluate_synthetic: test_images must be [N, C, H, W], got {tuple(test_images.shape)}"
        )
    check_eval_data(
        synthetic, test_images, test_labels, "evaluate_synthetic", "test", input_space,
        hint="; use the matching data set",
    )
    if train_sets is not None and train_data is not None:
        raise InputError("evaluate_synthetic: give train_sets (one per run) or train_data "
                         "(one for all runs), not both")
    if train_data is not None and use_trainer:
        raise InputError("evaluate_synthetic: train_data needs the plain loop "
                         "(use_trainer=False)")
    if train_sets is not None:
        if len(train_sets) != runs:
            raise InputError(f"evaluate_synthetic: {len(train_sets)} train_sets for {runs} runs")
        if use_trainer:
            raise InputError("evaluate_synthetic: train_sets needs the plain loop "
                             "(use_trainer=False)")
    dev = torch.device(device) if device is not None else synthetic.images.device
    seeds = [int(seed) + r for r in range(runs)]
    augment = protocol_dsa(protocol, synthetic.meta.get("dataset"))
    images: Any  # a tensor, a row source, or one tensor per run
    labels: Tensor | list[Tensor]
    if train_data is not None:
        images, labels = train_data
    elif train_sets is None:
        images, labels = synthetic.images, synthetic.labels
    else:
        images = [x for x, _ in train_sets]
        labels = [y for _, y in train_sets]
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        mkw = dict((model_kwargs or {}).get(name, {}))
        if use_trainer:
            accs: list[float] = []
            class_accs: list[list[float | None]] = []
            size = protocol.group_size_for(dev, synthetic.images.shape[0],
                                           synthetic.images.shape)
            for part in chunks(seeds, size):
                a, c = _run_with_trainer(
                    synthetic, name, mkw, part, protocol, test_images, test_labels,
                    test_batch_size, dev,
                )
                accs.extend(a)
                class_accs.extend(c)
                if on_progress is not None:
                    on_progress(len(part))
        else:
            runs_out = protocol.train_runs_results(
                name, mkw, seeds, images, labels, set_lr=synthetic.lr,
                num_classes=synthetic.num_classes, test_images=test_images,
                test_labels=test_labels, test_batch_size=test_batch_size, device=dev,
                augment=augment, on_progress=on_progress,
            )
            accs = [r["accuracy"] for r in runs_out]
            class_accs = [list(r["class_accuracy"]) for r in runs_out]
        mean, std = summarize(accs)
        results[name] = {"accs": accs, "mean": mean, "std": std, "class_accs": class_accs,
                         "class_mean": _class_mean(class_accs)}
    return results


def _run_with_trainer(
    synthetic: SyntheticSet, name: str, mkw: dict, seeds: Sequence[int], protocol: EvalProtocol,
    test_images: Tensor, test_labels: Tensor, test_batch_size: int, dev: torch.device,
) -> tuple[list[float], list[list[float | None]]]:
    seed: int | list[int] = int(seeds[0]) if len(seeds) == 1 else [int(s) for s in seeds]
    module = EvalModule(synthetic, model=name, model_kwargs=mkw, protocol=protocol, seed=seed)
    if isinstance(test_images, Tensor):
        test_loader: Any = DataLoader(
            TensorDataset(test_images.detach().cpu(), test_labels.detach().cpu().long()),
            batch_size=test_batch_size,
        )
    else:  # a row source (a streamed split): the same batches, each read when served
        test_loader = RowBatches(test_images, test_labels.detach().cpu().long(),
                                 test_batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer = _quiet_trainer(module.epochs, dev, protocol.precision)
        trainer.fit(module)
        trainer.test(module, dataloaders=test_loader, verbose=False)
    assert module.test_accuracies is not None and module.test_class_accuracies is not None
    return list(module.test_accuracies), [list(c) for c in module.test_class_accuracies]
