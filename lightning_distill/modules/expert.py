"""ExpertTrajectoryModule: train one expert network on real data (docs/method.md, 'Expert
trajectories').

MTT experts: SGD lr 0.01, momentum 0, weight decay 0, constant lr, batch 256, DSA on
every real batch. FTD/DATM wrap the same SGD in GSAM: add the
:class:`~lightning_distill.callbacks.GSAM` callback. The module follows the
*loss protocol* of :mod:`lightning_distill.callbacks.sharpness`: every training step
sets ``self.loss_closure``, which recomputes the loss on the same augmented batch.

Example (the shapes come from the datamodule; the recorder creates the store on the
first run and records the next missing expert on each later one)::

    from lightning_distill import ExpertTrajectoryModule, RealDataModule
    from lightning_distill.callbacks import GSAM, TrajectoryRecorder

    pl.seed_everything(0)  # expert i: its own seed
    module = ExpertTrajectoryModule("ConvNet", dsa_seed=0)
    trainer = pl.Trainer(max_epochs=50, callbacks=[
        GSAM(rho=0.01, alpha=0.3), TrajectoryRecorder("outputs/cifar10/experts")])
    trainer.fit(module, datamodule=RealDataModule("cifar10", zca=True))

:class:`GroupExpertModule` trains K experts as one vectorised model (the ``experts``
stage's ``group_size``): member k is the expert a one-at-a-time run would train with
member k's seeds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..data.augment import DEFAULT_DSA_STRATEGY, DSA, ResumableGenerator, dsa_flip_for
from ..errors import InputError, StateError
from ..functional.batched import StackedNetworks, augment_members, member_losses
from ..functional.evaluation import seeded_model
from ..models import build_model, to_hw
from ._build import check_fit, cpu_float32

__all__ = ["ExpertTrajectoryModule", "GroupExpertModule"]


#: the data set's shape: hyperparameters that may be None (taken from the datamodule)
SHAPE_HPARAMS = ("channels", "num_classes", "image_size")


def _accuracy(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy over everything seen since the last reset (correct / total), synced
    over DDP ranks when computed. Labels are not validated (a host-device sync per step);
    ``cross_entropy`` already rejects labels out of range."""
    return MulticlassAccuracy(int(num_classes), average="micro", validate_args=False)



class _ExpertSteps(pl.LightningModule):
    """What one expert and a group of experts share: the base SGD on ``self.net``
    (hyperparameters ``lr``, ``momentum``, ``weight_decay``), validation / test steps
    through ``self._evaluate(batch, prefix)``, and the network built from the
    datamodule's shapes in :meth:`configure_model` when ``channels``, ``num_classes`` or
    ``image_size`` is None (subclasses build it in ``_build(channels, num_classes,
    image_size)``, network and metrics)."""

    net: nn.Module | None

    def _build(self, channels: int, num_classes: int,
               image_size: int | tuple[int, int]) -> None:
        raise NotImplementedError

    def _make_augment(self, dataset: str | None = None) -> DSA | None:
        """The DSA of the hyperparameters; ``dsa_flip`` None keeps the flip family unless
        ``dataset`` is a digit data set (``dsa_flip_for``; resolved in :meth:`setup` from
        the datamodule's ``name``, flip kept until then)."""
        hp = self.hparams
        if not hp.dsa:
            return None
        flip = hp.dsa_flip
        if flip is None:
            flip = dsa_flip_for(dataset) if dataset is not None else True
        return DSA(hp.dsa_strategy, flip=flip)

    def setup(self, stage: str) -> None:
        check_fit(self)
        if self.hparams.dsa and self.hparams.dsa_flip is None:
            try:
                dataset = getattr(self.trainer.datamodule, "name", None)
            except RuntimeError:  # not attached to a Trainer
                dataset = None
            if isinstance(dataset, str):
                self.augment = self._make_augment(dataset)

    def _init_network(self) -> None:
        """Build now if every shape hyperparameter is given, else leave it to
        :meth:`configure_model`."""
        self.net = None
        if all(self.hparams[k] is not None for k in SHAPE_HPARAMS):
            self._build(**{k: self.hparams[k] for k in SHAPE_HPARAMS})

    def configure_model(self) -> None:
        """Lightning's hook (after the datamodule's ``setup``, before a checkpoint's weights
        are loaded): build the network when the shapes were not all given, from
        ``trainer.datamodule.channels`` / ``num_classes`` / ``image_size``, and write them
        into ``self.hparams`` (checkpoints, and the stores a
        :class:`~lightning_distill.callbacks.TrajectoryRecorder` creates, record the real
        shapes). Built on the CPU in float32, as eager construction: the same global seed
        gives the same network. Does nothing once the network exists."""
        if self.net is not None:
            return
        shapes = self._datamodule_shapes()
        self.hparams.update(shapes)
        with cpu_float32():
            self._build(**{k: self.hparams[k] for k in SHAPE_HPARAMS})

    def _datamodule_shapes(self) -> dict[str, Any]:
        """The missing shape hyperparameters, read from the Trainer's datamodule."""
        missing = [k for k in SHAPE_HPARAMS if self.hparams[k] is None]
        name = type(self).__name__
        try:
            dm = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer
            dm = None
        out: dict[str, Any] = {}
        problems = []
        for k in missing:
            if dm is None:
                problems.append(k)
                continue
            try:
                value = getattr(dm, k)
            except AttributeError:
                value, why = None, "no such attribute"
            except RuntimeError as e:  # RealDataModule before setup()
                value, why = None, str(e)
            else:
                why = "None"
            if value is None:
                problems.append(f"{k} ({why})")
                continue
            out[k] = to_hw(value) if k == "image_size" else int(value)
        if problems:
            where = ("there is no Trainer datamodule to read them from (Trainer.fit(model, "
                     "datamodule=...))" if dm is None else
                     f"the datamodule {type(dm).__name__} does not provide "
                     f"{', '.join(problems)}")
            raise InputError(
                f"{name}: {missing} not given and {where}; pass channels, num_classes and "
                "image_size, or fit with a datamodule exposing them after setup() "
                "(RealDataModule does)")
        return out

    def _network(self) -> nn.Module:
        if self.net is None:
            raise StateError(
                f"{type(self).__name__}: the network is built from the datamodule's shapes in "
                "configure_model() (channels / num_classes / image_size were not given); run "
                "it under a Trainer with a datamodule, or pass the shapes")
        return self.net

    def _build_train_metrics(self, num_classes: int) -> None:
        # no NaN check per update: it reads the loss back to the host (a device sync on a
        # GPU every step), and a NaN loss reaches the epoch mean as it did through self.log.
        # (torchmetrics' "disable" ignores the weights: _log_train_step passes B copies.)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = _accuracy(num_classes)

    def _log_train_step(self, loss: Tensor, batch_size: int) -> None:
        """One ``self.log`` per step, the step's loss (this rank, for the progress bar and
        the loggers). The epoch's loss (weighted by ``batch_size``) and accuracy accumulate
        in torchmetrics objects and are logged once, in :meth:`on_train_epoch_end`: each
        ``self.log`` call costs about a millisecond of Lightning's bookkeeping, and the three
        calls a step used to make were a fifth of a digits expert's step
        (benchmarks/HISTORY.md, 'The matmul pool in every ConvNet; one log call per expert
        step')."""
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.train_loss.update(loss.expand(batch_size))  # weight batch_size

    def on_train_epoch_end(self) -> None:
        """``train/loss_epoch`` and ``train/acc``: the metric objects, which Lightning
        computes (torchmetrics synchronises them over the ranks) and resets."""
        if not self.train_loss.update_called:  # no training batch this epoch
            return
        self.log("train/loss_epoch", self.train_loss)
        self.log("train/acc", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)


class ExpertTrajectoryModule(_ExpertSteps):
    """One expert: a ``build_model`` network trained with SGD (+ DSA) on real data.

    Args:
        model: ``build_model`` name (ConvNet, ConvNetD4, ...).
        channels, num_classes, image_size: the data set's shape. Those left None (the
            default) are taken from the Trainer's datamodule (``RealDataModule`` exposes
            all three after ``setup``) and the network is built in :meth:`configure_model`;
            all three given, the network is built here. Either way ``self.hparams`` ends
            with the real values.
        model_kwargs: extra ``build_model`` keywords (width, depth, norm, ...).
        lr, momentum, weight_decay: the SGD settings (defaults 0.01 / 0 / 0 as MTT:
        docs/method.md, 'Expert trajectories').
        dsa: augment every training batch with DSA; ``dsa_strategy`` and ``dsa_flip``
            configure it (``dsa_flip`` None: flip unless the datamodule's data set is a
            digit set, ``dsa_flip_for``).
        dsa_seed: seeds the DSA generator (:attr:`dsa_generator`, on the CPU, saved in
            checkpoints), so an expert's augmentations are reproducible.

    Logged: ``train/loss_step`` (this rank), ``train/loss_epoch`` and ``train/acc``
    (epoch means over all ranks; accuracy of the augmented batch before the step),
    ``val/loss`` and ``val/acc`` (un-augmented validation split), ``test/loss`` and
    ``test/acc``. The accuracies are torchmetrics ``MulticlassAccuracy`` objects
    (``train_acc``, ``val_acc``, ``test_acc``; correct / total over the epoch, synchronised
    over DDP ranks).

    :class:`~lightning_distill.callbacks.TrajectoryRecorder` records ``net``
    (:attr:`trajectory_module_attr`) and can create its store from this module's
    hyperparameters. A stock ``LightningCLI(ExpertTrajectoryModule, RealDataModule)``
    (``train.py``) trains expert i with ``python train.py fit --config experts.yaml
    --seed_everything i --model.dsa_seed i --data.shuffle_seed i``, each run recording the
    store's next missing expert (the three seeds are the initialisation, the DSA draws and
    the data order; the experts stage derives them from ``(seed, i)``)::

        model:
          model_kwargs: {width: 32, depth: 2}   # shapes: from the datamodule
          lr: 0.05                              # dsa_flip: none = off for digits
        data: {name: digits, batch_size: 32}
        trainer:
          max_epochs: 50
          callbacks:
            - class_path: lightning_distill.callbacks.GSAM
            - class_path: lightning_distill.callbacks.TrajectoryRecorder
              init_args: {store: outputs/digits/experts}
    """

    #: the attribute :class:`~lightning_distill.callbacks.TrajectoryRecorder` records by default
    trajectory_module_attr = "net"

    def __init__(
        self,
        model: str = "ConvNet",
        channels: int | None = None,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool | None = None,
        dsa_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._init_network()
        self.augment = self._make_augment()
        self._dsa_stream = ResumableGenerator(dsa_seed)
        self.loss_closure = None

    def _build(self, channels: int, num_classes: int,
               image_size: int | tuple[int, int]) -> None:
        hp = self.hparams
        self.net = build_model(
            hp.model, channels=channels, num_classes=num_classes, image_size=image_size,
            **(hp.model_kwargs or {}),
        )
        self._build_train_metrics(num_classes)
        self.val_acc = _accuracy(num_classes)
        self.test_acc = _accuracy(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self._network()(x)

    # -- DSA randomness: a CPU generator, saved in checkpoints ---------------------
    @property
    def dsa_generator(self) -> torch.Generator:
        """The generator of the DSA parameters, seeded with ``dsa_seed``: on the CPU
        whatever the module's device (:class:`ResumableGenerator`), so an expert sees the
        same augmentations on every device and a checkpoint resumes on any device."""
        return self._dsa_stream.generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dsa_generator_state"] = self._dsa_stream.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dsa_generator_state")
        if state is None:
            warnings.warn(
                "ExpertTrajectoryModule: the checkpoint has no 'dsa_generator_state'; the DSA "
                f"stream restarts from dsa_seed={self.hparams.dsa_seed}",
                stacklevel=2,
            )
        self._dsa_stream.restore(state)

    # -- steps ----------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.augment is not None:
            x = self.augment(x, generator=self.dsa_generator)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        # Loss protocol for SAM/ASAM/GSAM: recompute on the SAME augmented batch.
        self.loss_closure = lambda: F.cross_entropy(self.net(x), y)
        self.train_acc.update(logits.detach(), y)
        self._log_train_step(loss.detach(), y.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), sync_dist=True)
        acc = self.val_acc if prefix == "val" else self.test_acc
        acc.update(logits, y)
        self.log(f"{prefix}/acc", acc, prog_bar=True)


class GroupExpertModule(_ExpertSteps):
    """K experts trained as ONE vectorised model (docs/method.md, 'Expert trajectories', per
    member).

    Member k is expert k of a one-at-a-time run: its network is drawn from
    ``manual_seed(init_seeds[k])`` (what ``pl.seed_everything`` + :class:`ExpertTrajectoryModule`
    draws), its DSA parameters from a CPU generator seeded with ``dsa_seeds[k]``, its
    batches come from member k's own order (feed it
    :meth:`~lightning_distill.data.RealDataModule.member_train_dataloader`: batches
    ``[K, B, ...]``). The parameters are a
    :class:`~lightning_distill.functional.batched.StackedNetworks` (``self.net``,
    ``[K, *shape]`` per parameter); the training loss is the SUM of the members' mean
    cross-entropies, so SGD (element-wise) steps every member exactly as its own
    optimizer would, and DDP's gradient all-reduce averages each member over the ranks.

    Loss protocol of :mod:`lightning_distill.callbacks.sharpness`: ``loss_closure``
    recomputes the summed loss on the same augmented batches, and ``stacked_members = K``
    tells SAM / ASAM / GSAM to take their norms per member.

    ``channels``, ``num_classes`` and ``image_size`` may be None, as for
    :class:`ExpertTrajectoryModule`: then the members are built in :meth:`configure_model`
    from the datamodule's shapes (each from its own seed, so when does not matter).

    Logged: ``train/loss_step``, ``train/loss_epoch``, ``train/acc`` (means over the
    members), ``val/loss`` and ``val/acc`` (means over the members) and
    ``val/acc_expert_{index:05d}`` per member (``expert_indices``); ``test/...`` alike. The
    accuracies are torchmetrics ``MulticlassAccuracy`` objects: ``train/acc`` and
    ``{val,test}/acc`` over the K members' predictions together (the members see equally
    many samples, so this is the mean of their accuracies), ``{val,test}/acc_expert_*``
    one object per member (``val_member_acc[k]``, ``test_member_acc[k]``).
    """

    def __init__(
        self,
        model: str = "ConvNet",
        channels: int | None = None,
        num_classes: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        init_seeds: Sequence[int] = (0,),
        dsa_seeds: Sequence[int] = (0,),
        expert_indices: Sequence[int] | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        init_seeds = [int(s) for s in init_seeds]
        dsa_seeds = [int(s) for s in dsa_seeds]
        if not init_seeds or len(init_seeds) != len(dsa_seeds):
            raise InputError(f"GroupExpertModule: need as many dsa_seeds ({len(dsa_seeds)}) as "
                             f"init_seeds ({len(init_seeds)}), at least one")
        indices = list(range(len(init_seeds))) if expert_indices is None else [
            int(i) for i in expert_indices]
        if len(indices) != len(init_seeds):
            raise InputError("GroupExpertModule: one expert index per member")
        self.save_hyperparameters({
            "model": model, "channels": channels, "num_classes": num_classes,
            "image_size": image_size, "model_kwargs": dict(model_kwargs or {}),
            "init_seeds": init_seeds, "dsa_seeds": dsa_seeds, "expert_indices": indices,
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "dsa": dsa,
            "dsa_strategy": dsa_strategy, "dsa_flip": dsa_flip, "backend": backend})
        self.stacked_members = len(init_seeds)
        self.expert_indices = indices
        self._init_network()
        self.augment = self._make_augment()
        self._dsa_streams = [ResumableGenerator(s) for s in dsa_seeds]
        self.loss_closure = None

    def _build(self, channels: int, num_classes: int,
               image_size: int | tuple[int, int]) -> None:
        hp = self.hparams
        nets = [seeded_model(hp.model, channels, num_classes, image_size, seed=s,
                             **hp.model_kwargs) for s in hp.init_seeds]
        self.net = StackedNetworks(nets, backend=hp.backend)
        self._build_train_metrics(num_classes)
        self.val_acc = _accuracy(num_classes)
        self.test_acc = _accuracy(num_classes)
        self.val_member_acc = nn.ModuleList(_accuracy(num_classes) for _ in nets)
        self.test_member_acc = nn.ModuleList(_accuracy(num_classes) for _ in nets)

    def forward(self, x: Tensor) -> Tensor:
        """Member k's logits on member k's batch: ``[K, B, ...] -> [K, B, classes]``."""
        return self._network()(x)

    @property
    def dsa_generators(self) -> list[torch.Generator]:
        """The members' DSA generators (CPU, saved in checkpoints)."""
        return [s.generator for s in self._dsa_streams]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dsa_generator_states"] = [s.state() for s in self._dsa_streams]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("dsa_generator_states")
        if states is None or len(states) != len(self._dsa_streams):
            warnings.warn("GroupExpertModule: the checkpoint has no DSA generator states for "
                          "this group; the DSA streams restart from their seeds", stacklevel=2)
            states = [None] * len(self._dsa_streams)
        for stream, st in zip(self._dsa_streams, states, strict=True):
            stream.restore(st)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # [K, B, C, H, W], [K, B]
        if self.augment is not None:
            x = augment_members(self.augment, x, self.dsa_generators)
        logits = self.net(x)
        losses = member_losses(logits, y)
        # Loss protocol for SAM/ASAM/GSAM: recompute on the SAME augmented batches.
        self.loss_closure = lambda: member_losses(self.net(x), y).sum()
        mean_loss = losses.detach().mean()
        # every member sees B samples: accuracy over the K * B predictions = member mean
        self.train_acc.update(logits.detach().flatten(0, 1), y.flatten())
        self._log_train_step(mean_loss, y.shape[1])
        return losses.sum()

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch  # one batch seen by every member
        logits = self.net.forward_shared(x)
        k = logits.shape[0]
        self.log(f"{prefix}/loss", F.cross_entropy(logits.flatten(0, 1), y.repeat(k)),
                 sync_dist=True, batch_size=y.shape[0])
        acc, members = ((self.val_acc, self.val_member_acc) if prefix == "val"
                        else (self.test_acc, self.test_member_acc))
        acc.update(logits.flatten(0, 1), y.repeat(k))
        self.log(f"{prefix}/acc", acc, prog_bar=True)
        for i, member_logits, metric in zip(self.expert_indices, logits, members, strict=True):
            metric.update(member_logits, y)
            self.log(f"{prefix}/acc_expert_{i:05d}", metric)

