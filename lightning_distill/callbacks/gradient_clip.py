"""AdaptiveGradientClip: clip each gradient against its own recent history.

A trajectory-matching gradient flows back through the whole unrolled student, and now
and then one iteration's gradient is tens of times its usual size while its loss looks
ordinary, so DATM's loss threshold lets it through. On the Fashion-MNIST benchmark
(benchmarks/HISTORY.md, 'Fashion-MNIST, round 2') one such update, 73x the median of
the 50 before it, threw an ipc 10 set far enough that it never recovered. A fixed clip
value (Lightning's ``gradient_clip_val``, which manual optimization does not apply) would
have to be tuned per tensor, setting and data set: the images, the soft labels and the
step size have gradients orders of magnitude apart.

This callback clips each parameter's gradient norm to ``factor`` times the median of
that parameter's last ``history`` norms (measured before clipping, so one spike barely
moves the median), the idea of AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive
Gradient Clipping for Source Separation Networks", which clips to a percentile of the
whole history). A clipped gradient keeps its direction. The first ``warmup`` steps of a
parameter are only recorded. It runs in ``on_before_optimizer_step``, so it works under
automatic and manual optimization (the distillation module's), after a GradScaler has
unscaled the gradients; iterations skipped without gradients are not seen. Its history
is in the checkpoint, so a resumed run clips as the uninterrupted one would.

    trainer = pl.Trainer(callbacks=[AdaptiveGradientClip(factor=5.0, history=50)])

Logged: ``grad_clip/clipped``, how many parameter gradients it has clipped so far.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ..errors import InputError

__all__ = ["AdaptiveGradientClip"]


class AdaptiveGradientClip(Callback):
    """Clip each parameter's gradient norm to ``factor`` x the median of its last
    ``history`` norms.

    Args:
        factor: the clip level in medians (> 1). On the Fashion-MNIST benchmark the
            image gradients' 99th percentile was 3.7-4.4 medians at ipc 1 and 2.5 at
            ipc 10, so 5 clips about one update in 100-300 there.
        history: how many recent norms (before clipping) the median is taken over.
        warmup: steps of a parameter that are recorded without clipping (>= 1,
            <= history).
    """

    def __init__(self, factor: float = 5.0, history: int = 50, warmup: int = 10) -> None:
        if not factor > 1.0:
            raise InputError(f"AdaptiveGradientClip: factor must be > 1, got {factor}")
        if history < 1 or not 1 <= warmup <= history:
            raise InputError("AdaptiveGradientClip: need history >= 1 and "
                             f"1 <= warmup <= history, got history={history}, "
                             f"warmup={warmup}")
        self.factor = float(factor)
        self.history = int(history)
        self.warmup = int(warmup)
        self.norms: dict[str, deque[float]] = {}
        self.clipped = 0

    def clip_(self, named_params: list[tuple[str, torch.Tensor]]) -> int:
        """Record and clip the gradients of ``named_params`` in place; returns how many
        were clipped (the step's own work, also usable without a Trainer)."""
        count = 0
        for name, p in named_params:
            if p.grad is None:
                continue
            norm = float(p.grad.detach().norm())
            if not math.isfinite(norm):  # the module's own guard handles these
                continue
            past = self.norms.setdefault(name, deque(maxlen=self.history))
            if len(past) >= self.warmup:
                limit = self.factor * statistics.median_low(past)
                if norm > limit > 0.0:
                    p.grad.mul_(limit / norm)
                    count += 1
            past.append(norm)
        self.clipped += count
        return count

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        ids = {id(p): n for n, p in pl_module.named_parameters()}
        params = [(ids.get(id(p), f"group{g}.{k}"), p)
                  for g, group in enumerate(optimizer.param_groups)
                  for k, p in enumerate(group["params"])]
        self.clip_(params)
        for logger in trainer.loggers:
            logger.log_metrics({"grad_clip/clipped": float(self.clipped)},
                               step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": {k: list(v) for k, v in self.norms.items()},
                "clipped": self.clipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.norms = {k: deque(v, maxlen=self.history)
                      for k, v in state_dict.get("norms", {}).items()}
        self.clipped = int(state_dict.get("clipped", 0))
