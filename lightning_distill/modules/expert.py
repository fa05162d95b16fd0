"""ExpertTrajectoryModule: train one expert network on real data (docs/method.md, 'Expert
trajectories').

MTT experts: SGD lr 0.01, momentum 0, weight decay 0, constant lr, batch 256, DSA on
every real batch. FTD/DATM wrap the same SGD in GSAM: add the
:class:`~lightning_distill.callbacks.GSAM` callback. The module follows the
*loss protocol* of :mod:`lightning_distill.callbacks.sharpness`: every training step
sets ``self.loss_closure``, which recomputes the loss on the same augmented batch.

Example::

    from lightning_distill import ExpertTrajectoryModule, TrajectoryStore
    from lightning_distill.callbacks import GSAM, TrajectoryRecorder

    module = ExpertTrajectoryModule("ConvNet", channels=3, num_classes=10, image_size=32)
    trainer = pl.Trainer(max_epochs=50, callbacks=[GSAM(rho=0.01, alpha=0.3),
                                                   TrajectoryRecorder(store, expert_index=0)])
    trainer.fit(module, datamodule)

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
from torch import Tensor

from ..data.augment import DEFAULT_DSA_STRATEGY, DSA, ResumableGenerator
from ..functional.batched import StackedNetworks, augment_members, member_losses
from ..functional.evaluation import seeded_model
from ..models import build_model

__all__ = ["ExpertTrajectoryModule", "GroupExpertModule"]


class _ExpertSteps(pl.LightningModule):
    """What one expert and a group of experts share: the base SGD on ``self.net``
    (hyperparameters ``lr``, ``momentum``, ``weight_decay``) and validation / test steps
    through ``self._evaluate(batch, prefix)``."""

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
        channels, num_classes, image_size: the data set's shape.
        model_kwargs: extra ``build_model`` keywords (width, depth, norm, ...).
        lr, momentum, weight_decay: the SGD settings (defaults 0.01 / 0 / 0 as MTT:
        docs/method.md, 'Expert trajectories').
        dsa: augment every training batch with DSA; ``dsa_strategy`` and ``dsa_flip``
            configure it (flip is dropped for digit data sets).
        dsa_seed: seeds the DSA generator (:attr:`dsa_generator`, on the CPU, saved in
            checkpoints), so an expert's augmentations are reproducible.

    Logged: ``train/loss_step`` (this rank), ``train/loss_epoch`` and ``train/acc``
    (epoch means over all ranks; accuracy of the augmented batch before the step),
    ``val/loss`` and ``val/acc`` (un-augmented validation split).
    """

    def __init__(
        self,
        model: str = "ConvNet",
        channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool = True,
        dsa_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(
            model, channels=channels, num_classes=num_classes, image_size=image_size,
            **(model_kwargs or {}),
        )
        self.augment = DSA(dsa_strategy, flip=dsa_flip) if dsa else None
        self._dsa_stream = ResumableGenerator(dsa_seed)
        self.loss_closure = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

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
        acc = (logits.argmax(1) == y).float().mean()
        # Per-step loss: this rank's (no communication); epoch means: over all ranks.
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{prefix}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True,
                 sync_dist=True)



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

    Logged: ``train/loss_step``, ``train/loss_epoch``, ``train/acc`` (means over the
    members), ``val/loss`` and ``val/acc`` (means over the members) and
    ``val/acc_expert_{index}`` per member (``expert_indices``).
    """

    def __init__(
        self,
        model: str = "ConvNet",
        channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        model_kwargs: dict[str, Any] | None = None,
        init_seeds: Sequence[int] = (0,),
        dsa_seeds: Sequence[int] = (0,),
        expert_indices: Sequence[int] | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        init_seeds = [int(s) for s in init_seeds]
        dsa_seeds = [int(s) for s in dsa_seeds]
        if not init_seeds or len(init_seeds) != len(dsa_seeds):
            raise ValueError(f"GroupExpertModule: need as many dsa_seeds ({len(dsa_seeds)}) as "
                             f"init_seeds ({len(init_seeds)}), at least one")
        indices = list(range(len(init_seeds))) if expert_indices is None else [
            int(i) for i in expert_indices]
        if len(indices) != len(init_seeds):
            raise ValueError("GroupExpertModule: one expert index per member")
        self.save_hyperparameters({
            "model": model, "channels": channels, "num_classes": num_classes,
            "image_size": image_size, "model_kwargs": dict(model_kwargs or {}),
            "init_seeds": init_seeds, "dsa_seeds": dsa_seeds, "expert_indices": indices,
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "dsa": dsa,
            "dsa_strategy": dsa_strategy, "dsa_flip": dsa_flip, "backend": backend})
        nets = [seeded_model(model, channels, num_classes, image_size, seed=s,
                             **(model_kwargs or {})) for s in init_seeds]
        self.net = StackedNetworks(nets, backend=backend)
        self.stacked_members = len(nets)
        self.expert_indices = indices
        self.augment = DSA(dsa_strategy, flip=dsa_flip) if dsa else None
        self._dsa_streams = [ResumableGenerator(s) for s in dsa_seeds]
        self.loss_closure = None

    def forward(self, x: Tensor) -> Tensor:
        """Member k's logits on member k's batch: ``[K, B, ...] -> [K, B, classes]``."""
        return self.net(x)

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
        acc = (logits.argmax(2) == y).float().mean()
        self.log("train/loss_step", mean_loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", mean_loss, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=y.shape[1])
        self.log("train/acc", acc, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=y.shape[1])
        return losses.sum()

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch  # one batch seen by every member
        logits = self.net.forward_shared(x)
        k = logits.shape[0]
        self.log(f"{prefix}/loss", F.cross_entropy(logits.flatten(0, 1), y.repeat(k)),
                 sync_dist=True, batch_size=y.shape[0])
        accs = (logits.argmax(2) == y.unsqueeze(0)).float().mean(dim=1)
        self.log(f"{prefix}/acc", accs.mean(), prog_bar=True, sync_dist=True,
                 batch_size=y.shape[0])
        for i, a in zip(self.expert_indices, accs, strict=True):
            self.log(f"{prefix}/acc_expert_{i:05d}", a, sync_dist=True, batch_size=y.shape[0])

