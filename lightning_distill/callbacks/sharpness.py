"""Sharpness-aware training callbacks: ``SAM``, ``ASAM`` and ``GSAM`` (docs/method.md, 'Flat
experts (FTD, GSAM)').

FTD and DATM train their experts with GSAM (rho 0.01, alpha 0.3, weight-adaptive) on
top of plain SGD: flatter expert trajectories distil better. These callbacks turn any
automatic-optimization LightningModule into a sharpness-aware one without touching its
optimizer; the math lives in :mod:`lightning_distill.functional.sharpness`.

Loss protocol
-------------
A LightningModule used with these callbacks must, in every ``training_step``, set
``self.loss_closure`` to a zero-argument callable that recomputes the training loss on
the SAME, already augmented batch with the module's current parameters, and return the
loss from ``training_step`` as usual::

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self.augment(x)                      # random augmentation, drawn once
        self.loss_closure = lambda: self.criterion(self(x), y)
        return self.criterion(self(x), y)

The callback calls the closure once per step, for the second pass at the perturbed
weights, then resets ``loss_closure`` to ``None`` so a closure from an earlier batch can
never be reused. A module that does not set it gets an error at its first step.

What one optimizer step does (``on_before_optimizer_step``, which Lightning calls after
``backward`` and before gradient clipping and ``optimizer.step``):

1. ``g`` = the gradients already in ``p.grad`` (under DDP already averaged over ranks),
   for the parameters of the optimizer's param groups that have a gradient.
2. ``e = perturbation(w, g, rho, adaptive)``; the weights are copied, then ``w += e``.
3. ``g' = torch.autograd.grad(loss_closure(), params)`` (``autograd.grad``, not
   ``backward``, so DDP's reducer hooks do not fire; unused parameters get zeros).
   BatchNorm/InstanceNorm running statistics are saved before and restored after this
   pass, so they are updated once per step, by the first pass.
4. The saved weights are copied back (exact restoration, no ``w + e - e`` rounding).
5. ``p.grad = gsam_gradient(g, g', alpha)``; under DDP this final gradient is
   all-reduced (mean over ranks) once, so every rank steps identically.

Groups of networks: a module whose ``stacked_members`` attribute is a positive K (e.g.
:class:`~lightning_distill.modules.GroupExpertModule`, parameters
``[K, ...]`` of a :class:`~lightning_distill.functional.batched.StackedNetworks`, loss =
the sum of the members' losses) gets the update per member: every norm and inner
product is over member k's parameters only (``per_member=True`` in
:mod:`lightning_distill.functional.sharpness`), so member k steps exactly as a single
network k would. The stacked running statistics are saved and restored like a norm
layer's.

Precision: ``bf16-mixed`` is supported: the second pass runs inside the precision
plugin's ``train_step_context`` (the same autocast as the first), and the perturbation,
the weight copies and the final gradient are computed on the float32 parameters and
gradients (docs/method.md, 'Mixed precision').

Gradient clipping (``Trainer(gradient_clip_val=...)``) works unchanged: Lightning clips
after this hook, i.e. it clips the final gradient. Refused with an error in ``setup``:
mixed precision (``16-mixed`` gradients are loss-scaled and checked for overflow before
this hook, so the perturbation would be computed from scaled, possibly non-finite
gradients), ``accumulate_grad_batches > 1`` (the perturbation would use
a partial gradient, and the second pass would be accumulated wrongly), manual
optimization, strategies other than single-device and DDP (FSDP and DeepSpeed shard or
own the gradients), and more than one sharpness-aware callback on the same Trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from lightning_distill.functional.batched import StackedNetworks
from lightning_distill.functional.sharpness import gsam_gradient, perturbation

from ..errors import InputError, StateError
from ..protocols import LossClosure

__all__ = ["ASAM", "GSAM", "SAM", "SharpnessAware", "sharpness_settings"]

_SUPPORTED_PRECISION = ("32-true", "64-true", "16-true", "bf16-true", "bf16-mixed")

_PROTOCOL = (
    "set `self.loss_closure = lambda: <loss on the same augmented batch>` in training_step "
    "(a zero-argument callable recomputing the training loss with the current parameters), "
    "see the loss protocol in lightning_distill/callbacks/sharpness.py"
)


class SharpnessAware(Callback):
    """Sharpness-aware update shared by SAM, ASAM and GSAM (docs/method.md, 'Flat experts (FTD,
    GSAM)').

    Args:
        rho: perturbation radius (>= 0).
        alpha: GSAM weight of the gradient component orthogonal to ``g'``; 0 gives SAM/ASAM.
        adaptive: weight-adaptive perturbation ``e = rho w^2 g / || |w| g ||`` (ASAM, GSAM)
            instead of ``e = rho g / ||g||`` (SAM).
        eps: the ``1e-12`` added to every denominator (docs/method.md, 'Flat experts (FTD,
            GSAM)').

    Example::

        trainer = pl.Trainer(callbacks=[SharpnessAware(rho=0.01, alpha=0.3, adaptive=True)])
        trainer.fit(module)  # module follows the loss protocol (module docstring)
    """

    def __init__(self, rho: float, alpha: float = 0.0, adaptive: bool = False, eps: float = 1e-12):
        super().__init__()
        self.rho, self.alpha, self.adaptive, self.eps = _validate(rho, alpha, adaptive, eps)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho}, alpha={self.alpha}, adaptive={self.adaptive})"
        )

    # ------------------------------------------------------------------ checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        others = [c for c in trainer.callbacks if isinstance(c, SharpnessAware) and c is not self]
        if others:
            raise StateError(
                f"{name}: the Trainer has more than one sharpness-aware callback "
                f"({self!r} and {others[0]!r}); keep exactly one of SAM / ASAM / GSAM."
            )
        if not pl_module.automatic_optimization:
            raise StateError(
                f"{name} needs automatic optimization, but {type(pl_module).__name__} sets "
                "`automatic_optimization = False`. With manual optimization, perform the two "
                "passes yourself with lightning_distill.functional.sharpness."
            )
        _check_accumulation(trainer, name)
        precision = str(trainer.precision)
        if precision not in _SUPPORTED_PRECISION:
            if precision.startswith("16"):
                why = (
                    "its gradients are loss-scaled by a GradScaler whose overflow check runs "
                    "before this callback, and the second pass would run outside autocast"
                )
            else:
                why = "the gradients are not plain full-graph gradients in one dtype"
            raise StateError(
                f"{name} does not support Trainer(precision={precision!r}): {why}. "
                f"Use one of {', '.join(_SUPPORTED_PRECISION)}."
            )
        strategy = trainer.strategy
        deepspeed = any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__)
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or deepspeed:
            raise StateError(
                f"{name} supports single-device and DDP strategies, got "
                f"{type(strategy).__name__}: sharded strategies (FSDP, DeepSpeed) own the "
                "gradients. Use strategy='ddp' (or 'ddp_spawn') for data parallelism."
            )

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        closure = pl_module.loss_closure if isinstance(pl_module, LossClosure) else None
        params = _params_with_grad(optimizer)
        if not params:  # training_step returned None: Lightning skipped backward
            if closure is not None:
                pl_module.loss_closure = None
            return
        name = type(self).__name__
        if closure is None or not callable(closure):
            raise StateError(
                f"{name}: {type(pl_module).__name__} does not follow the loss protocol: "
                f"`loss_closure` is {closure!r}. In training_step, {_PROTOCOL}."
            )
        pl_module.loss_closure = None  # consumed: never reuse a closure from an older batch
        _check_accumulation(trainer, name)
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise StateError(f"{name} does not support sparse gradients.")

        per_member = int(getattr(pl_module, "stacked_members", 0) or 0) > 0
        with torch.no_grad():
            originals = [p.detach().clone() for p in params]
            e = perturbation(originals, grads, self.rho, self.adaptive, self.eps, per_member)
            for p, e_p in zip(params, e, strict=True):
                p.add_(e_p)
            del e
        norm_state = _save_running_stats(pl_module)
        try:
            with torch.enable_grad(), trainer.precision_plugin.train_step_context():
                loss = closure()
            _check_loss(loss, name)
            g_prime = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)
            _restore_running_stats(norm_state)
        g_prime = [
            torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, g_prime, strict=True)
        ]
        final = gsam_gradient(grads, g_prime, self.alpha, self.eps, per_member)
        if trainer.world_size > 1 and _distributed():
            final = _all_reduce_mean(final)
        with torch.no_grad():
            for p, f in zip(params, final, strict=True):
                p.grad.copy_(f)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "alpha": self.alpha, "adaptive": self.adaptive, "eps": self.eps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loaded = _validate(
            state_dict["rho"],
            state_dict["alpha"],
            state_dict["adaptive"],
            state_dict.get("eps", self.eps),
        )
        current = (self.rho, self.alpha, self.adaptive, self.eps)
        if loaded != current:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was trained with "
                f"(rho, alpha, adaptive, eps)={loaded}, this callback was created with "
                f"{current}; resuming with the checkpoint's values."
            )
        self.rho, self.alpha, self.adaptive, self.eps = loaded


class SAM(SharpnessAware):
    """Sharpness-Aware Minimization (Foret et al., 2021): ``e = rho g / ||g||``, final ``g'``.

    Example::

        from lightning_distill.callbacks import SAM
        trainer = pl.Trainer(max_epochs=10, callbacks=[SAM(rho=0.05)])
        trainer.fit(module)  # module sets self.loss_closure in training_step

    See :mod:`lightning_distill.callbacks.sharpness` for the loss protocol.
    """

    def __init__(self, rho: float = 0.05, eps: float = 1e-12):
        super().__init__(rho=rho, alpha=0.0, adaptive=False, eps=eps)


class ASAM(SharpnessAware):
    """Adaptive SAM (Kwon et al., 2021, eta = 0): ``e = rho w^2 g / || |w| g ||``, final ``g'``.

    Example::

        from lightning_distill.callbacks import ASAM
        trainer = pl.Trainer(max_epochs=10, callbacks=[ASAM(rho=0.5)])
        trainer.fit(module)  # module sets self.loss_closure in training_step

    See :mod:`lightning_distill.callbacks.sharpness` for the loss protocol.
    """

    def __init__(self, rho: float = 0.5, eps: float = 1e-12):
        super().__init__(rho=rho, alpha=0.0, adaptive=True, eps=eps)


class GSAM(SharpnessAware):
    """Surrogate-gap guided SAM (Zhuang et al., 2022) as used by FTD/DATM experts.

    Perturbation ``e = rho w^2 g / || |w| g ||`` (``adaptive=True``, the FTD/DATM
    default) or ``rho g / ||g||``; final gradient ``g' - alpha * g_perp`` with ``g_perp``
    the component of ``g`` orthogonal to ``g'`` (docs/method.md, 'Flat experts (FTD, GSAM)').

    Example::

        from lightning_distill.callbacks import GSAM
        trainer = pl.Trainer(max_epochs=100, callbacks=[GSAM(rho=0.01, alpha=0.3)])
        trainer.fit(module)  # module sets self.loss_closure in training_step

    See :mod:`lightning_distill.callbacks.sharpness` for the loss protocol.
    """

    def __init__(
        self, rho: float = 0.01, alpha: float = 0.3, adaptive: bool = True, eps: float = 1e-12
    ):
        super().__init__(rho=rho, alpha=alpha, adaptive=adaptive, eps=eps)


# ---------------------------------------------------------------------- helpers
def _validate(rho: Any, alpha: Any, adaptive: Any, eps: Any) -> tuple[float, float, bool, float]:
    rho, alpha, eps = float(rho), float(alpha), float(eps)
    if not rho >= 0 or rho == float("inf"):
        raise InputError(f"sharpness-aware callback: rho must be a finite number >= 0, got {rho}")
    if not abs(alpha) < float("inf"):
        raise InputError(f"sharpness-aware callback: alpha must be finite, got {alpha}")
    if not eps > 0:
        raise InputError(f"sharpness-aware callback: eps must be > 0, got {eps}")
    if not isinstance(adaptive, bool):
        raise InputError(
            f"sharpness-aware callback: adaptive must be True or False, got {adaptive!r}"
        )
    return rho, alpha, adaptive, eps


def _check_accumulation(trainer: pl.Trainer, name: str) -> None:
    if trainer.accumulate_grad_batches > 1:
        raise StateError(
            f"{name} does not support Trainer(accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}): the perturbation would be computed from a "
            "partial gradient. Use accumulate_grad_batches=1 and a larger batch size."
        )


def _check_loss(loss: Any, name: str) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise StateError(
            f"{name}: `loss_closure()` must return a scalar loss tensor, got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}. "
            f"In training_step, {_PROTOCOL}."
        )
    if not loss.requires_grad:
        raise StateError(
            f"{name}: the loss returned by `loss_closure()` does not require grad; it must be "
            "computed from the module's parameters (not detached, not under no_grad)."
        )


def _params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    seen: set[int] = set()
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _save_running_stats(module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Clone the running statistics (mean, var, num_batches_tracked) of every norm layer
    (and the stacked buffers of a :class:`StackedNetworks`, which are exactly those)."""
    saved = []
    for m in module.modules():
        if isinstance(m, StackedNetworks):
            saved.extend((buf, buf.detach().clone()) for buf in m.buffers(recurse=False))
        elif isinstance(m, _NormBase) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    return saved


def _restore_running_stats(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, value in saved:
            buf.copy_(value)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Mean over ranks, one all-reduce per (device, dtype) bucket (normally exactly one)."""
    world = torch.distributed.get_world_size()
    out: list[Tensor] = list(tensors)
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def sharpness_settings(callbacks: Any) -> dict[str, Any]:
    """The settings of the first SAM / ASAM / GSAM callback of ``callbacks`` as a store
    records them (``{"method": "none"}`` without one)."""
    sharp = [c for c in callbacks or [] if isinstance(c, SharpnessAware)]
    if not sharp:
        return {"method": "none"}
    c = sharp[0]
    return {"method": type(c).__name__.lower(), "rho": c.rho, "alpha": c.alpha,
            "adaptive": c.adaptive}
