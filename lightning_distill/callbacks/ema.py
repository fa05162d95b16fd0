"""SyntheticEMA: exponential moving average of the synthetic images (FTD).

Du et al., CVPR 2023; docs/method.md, section 'EMA of the synthetic images'.

After each image step, E <- d E + (1 - d) X, E starting at the initial X (the FTD
reference). With ``bias_correction=True`` the average starts from zero instead and
is divided by (1 - d^k) after k steps (as in Adam), so the initialisation does not
linger: with d = 0.9999 and 5000 steps, 61% of the uncorrected E is still the
initial X.

Both variants are computed from one accumulator A_k = d A_{k-1} + (1 - d) X_k,
A_0 = 0: uncorrected E_k = d^k X_0 + A_k; corrected E_k = A_k / (1 - d^k).

Example::

    trainer = pl.Trainer(callbacks=[SyntheticEMA(decay=0.9995)])
    trainer.fit(distillation_module)
    ema_set = distillation_module.ema_synthetic_set()
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from ..errors import InputError, StateError


class SyntheticEMA(Callback):
    """EMA of ``pl_module.images`` over the image steps that were taken."""

    def __init__(self, decay: float = 0.999, bias_correction: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise InputError(f"SyntheticEMA: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.bias_correction = bool(bias_correction)
        self.initial: Tensor | None = None
        self.accumulator: Tensor | None = None
        self.num_updates = 0

    def _start(self, images: Tensor) -> None:
        self.initial = images.detach().clone()
        self.accumulator = torch.zeros_like(self.initial)
        self.num_updates = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.synthetic_ema = self

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial is None:
            self._start(pl_module.images)
        else:  # restored from a checkpoint: move to the module's device
            self.initial = self.initial.to(pl_module.images.device)
            self.accumulator = self.accumulator.to(pl_module.images.device)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """One EMA step with the current images."""
        if self.initial is None:
            self._start(images)
        self.accumulator.mul_(self.decay).add_(images.detach(), alpha=1.0 - self.decay)
        self.num_updates += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # DistillationModule calls update() itself right after its image step (so every
        # callback, e.g. a checkpoint, sees the EMA of the same step whatever the order);
        # other modules holding ``images`` are updated here.
        if getattr(pl_module, "synthetic_ema", None) is self:
            return
        if getattr(pl_module, "last_step_taken", True):
            self.update(pl_module.images)

    @property
    def average(self) -> Tensor:
        """The EMA images (bias-corrected if configured)."""
        if self.initial is None:
            raise StateError("SyntheticEMA: no images seen yet")
        k = self.num_updates
        if self.bias_correction:
            if k == 0:
                return self.initial.clone()
            return self.accumulator / (1.0 - self.decay**k)
        return self.initial * self.decay**k + self.accumulator

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "bias_correction": self.bias_correction,
                "num_updates": self.num_updates,
                "initial": None if self.initial is None else self.initial.cpu(),
                "accumulator": None if self.accumulator is None else self.accumulator.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decay = float(state_dict["decay"])
        self.bias_correction = bool(state_dict["bias_correction"])
        self.num_updates = int(state_dict["num_updates"])
        self.initial = state_dict["initial"]
        self.accumulator = state_dict["accumulator"]
