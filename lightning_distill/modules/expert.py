"""ExpertTrajectoryModule: train one expert network on real data (REFERENCE section 4).

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
"""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.augment import DEFAULT_DSA_STRATEGY, DSA, ResumableGenerator
from ..models import build_model


class ExpertTrajectoryModule(pl.LightningModule):
    """One expert: a ``build_model`` network trained with SGD (+ DSA) on real data.

    Args:
        model: ``build_model`` name (ConvNet, ConvNetD4, ...).
        channels, num_classes, image_size: the data set's shape.
        model_kwargs: extra ``build_model`` keywords (width, depth, norm, ...).
        lr, momentum, weight_decay: the SGD settings (defaults 0.01 / 0 / 0: REFERENCE 4).
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

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)
