"""Trajectory matching: the unrolled student and its normalised matching loss.

One outer iteration of MTT / FTD / DATM (MTT: Cazenavette et al., CVPR 2022; docs/method.md,
section 'Matching loss'): starting from an expert
snapshot theta_0 = ``start``, the student takes N = ``len(batches)`` SGD steps on the
synthetic set,

    theta_{i+1} = theta_i - syn_lr * grad_theta loss(f(aug(X[idx_i]); theta_i), Y[idx_i]),

and the loss is ||theta_N - target||^2 / ||start - target||^2. Its gradient w.r.t. the
pixels X, the (soft) labels Y and the step size syn_lr is computed in one of three ways:

- ``"full"``: the reference semantics; every step's graph is kept (create_graph), so
  activation memory grows with N.
- ``"recompute"``: the same exact gradient with activation memory independent of N. The
  forward keeps only theta_0..theta_{N-1} (N x P floats) and the augmentation
  parameters; the backward walks the steps in reverse, recomputes step i with a graph
  and carries the adjoint lambda_i = dL/dtheta_i (docs/method.md, 'Exact recompute mode'):

      lambda_N   = 2 (theta_N - target) / D
      lambda_i   = lambda_{i+1} - syn_lr * (d g_i / d theta_i)^T lambda_{i+1}
      dL/dX_i   += -syn_lr * (d g_i / d X_i)^T lambda_{i+1}      (same for Y_i)
      dL/dsyn_lr += -<lambda_{i+1}, g_i>

- ``"tesla"``: TESLA's constant-memory approximation (Cui et al., ICML 2023; docs/method.md,
  'TESLA approximation'). theta_N = theta_0 - syn_lr G with G = sum_i g_i, so dL/dg_i = c
  for every i with c = -(2 syn_lr / D)(theta_N - target); pass 2 backpropagates c . g_i
  into each step's pixels and labels. This DROPS the cross-step terms (later g_j depend on
  earlier pixels through theta): it is APPROXIMATE (cosine with the exact gradient ~0.9997 at
  syn_lr = 0.01, degrading at large syn_lr). The syn_lr gradient is TESLA's
  (2/D)<theta_N - target, -G>: exact for L(syn_lr) = ||theta_0 - syn_lr G - target||^2 / D
  with G held fixed, i.e. it too ignores how G depends on syn_lr through theta_i.
  (The pass-2 vector is derived by differentiating the loss: (2/D)(syn_lr^2 G - syn_lr
  (theta_0 - target)); docs/design.md, 'Deviations from the references'.)

Two options change what is matched (docs/method.md, 'Beyond DATM'): ``param_mask``, PAD's
parameter selection (Li et al., 2024: the loss over a subset of the flat parameters, the
same subset in numerator and denominator; :func:`parameter_mask`), and ``match="closest"``,
ATT's automatic trajectory length (Liu et al., ECCV 2024: the student step closest to the
target is matched; :func:`trajectory_matching`). With neither, every mode computes exactly
what it computed before they existed.

Mixed precision (docs/method.md, 'Mixed precision'): called under ``torch.autocast`` (a
Trainer with ``precision="bf16-mixed"``), the student's forward and its gradients run in
the autocast dtype in every mode: the recompute/tesla backward re-enters the autocast
state the loss was called under. What autocast does not touch stays in the dtype of
``images`` (float32): theta and the trajectory, the step theta - syn_lr g, the matching
distance and its normalisation, and the gradients of the pixels, labels and syn_lr.

The window rule of DATM (docs/method.md, 'Matching window') and the synthetic minibatch
sampler ('Matching loss', step 2) live here too, as pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from lightning_distill.functional.device import to_device
from lightning_distill.functional.losses import classification_loss
from lightning_distill.models.params import ParamSpec, has_running_stats

from ..errors import InputError, InputTypeError

__all__ = [
    "MATCHING_MODES",
    "MATCH_RULES",
    "MatchResult",
    "parameter_mask",
    "sample_minibatches",
    "sample_start_epoch",
    "trajectory_matching",
    "trajectory_matching_loss",
    "window_upper_bound",
]

MATCHING_MODES = ("full", "recompute", "tesla")
MATCH_RULES = ("last", "closest")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _Autocast:
    """The autocast state the loss was called under, to re-enter in the recompute/tesla
    backward (autograd runs a Function's backward outside the caller's autocast): the
    replayed steps then run in the same precision as the forward's (docs/method.md,
    'Mixed precision')."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> _Autocast:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


# --------------------------------------------------------------------------- helpers


class _Augmenter:
    """Applies the per-step augmentation and remembers how to replay it.

    A DSA-like object (``sample(x, generator)`` + ``apply(x, params)``) is sampled once per
    step in the first pass; later passes replay the stored parameters. Any other callable
    is applied as ``augment(x)`` and assumed deterministic.
    """

    def __init__(self, augment: Any, generator: torch.Generator | None) -> None:
        self.augment = augment
        self.generator = generator
        self.replayable = (
            augment is not None
            and callable(getattr(augment, "sample", None))
            and callable(getattr(augment, "apply", None))
        )
        self.params: list[Any] = []

    def sample_apply(self, x: Tensor) -> Tensor:
        if self.augment is None:
            return x
        if self.replayable:
            p = self.augment.sample(x, self.generator)
            self.params.append(p)
            return self.augment.apply(x, p)
        return self.augment(x)

    def replay(self, x: Tensor, step: int) -> Tensor:
        if self.augment is None:
            return x
        if self.replayable:
            return self.augment.apply(x, self.params[step])
        return self.augment(x)


@dataclass
class MatchResult:
    """What one unroll matched: the loss and the student step it was computed at.

    ``step`` is k, the number of student steps behind ``loss`` (N for ``match="last"``,
    ATT's k* for ``match="closest"``); ``distances`` holds, for ``"closest"``, the L1
    distance D_k = sum |theta_k - target| over the matched parameters for k = 1..N
    (None for ``"last"``).
    """

    loss: Tensor
    step: int
    distances: Tensor | None = None


@dataclass
class _Problem:
    """Everything an unroll needs besides the differentiable inputs (images, labels, syn_lr)."""

    model: nn.Module
    spec: ParamSpec
    loss_fn: LossFn
    batches: list[Tensor]
    start: Tensor
    target: Tensor
    aug: _Augmenter
    mask: Tensor | None = None  # bool [P]: the parameters that are matched (None: all)
    match: str = "last"
    autocast: _Autocast = _Autocast("cpu", False, torch.bfloat16)  # the caller's (_prepare)
    denom: float = 0.0
    # set by the forward unroll
    matched_step: int = 0
    distances: Tensor | None = None

    def __post_init__(self) -> None:
        self.denom = float(self.masked(self.start - self.target).square().sum())

    def masked(self, d: Tensor) -> Tensor:
        """``d`` on the matched parameters, zero elsewhere (the identity without a mask)."""
        if self.mask is None:
            return d
        return torch.where(self.mask, d, d.new_zeros(()))

    def matching_value(self, theta: Tensor) -> Tensor:
        """||theta - target||^2 / ||start - target||^2 over the matched parameters."""
        return self.masked(theta - self.target).square().sum() / self.denom

    def distance(self, theta: Tensor) -> Tensor:
        """ATT's D_k = sum |theta_k - target| over the matched parameters (no graph)."""
        return self.masked(theta.detach() - self.target).abs().sum()

    def inner_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, self.spec.unflatten(theta), (x,))
        return self.loss_fn(out, y)

    def grad_no_graph(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """g = grad_theta loss, no graph kept (pixels and labels treated as constants)."""
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.inner_loss(th, x, y), th)
        return g

    def replay_step(
        self,
        step: int,
        theta: Tensor,
        images: Tensor,
        labels: Tensor,
        need_x: bool,
        need_y: bool,
        create_graph: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Recompute step ``step`` at ``theta`` with a graph (augmentation replayed).

        Returns ``(g, th, xb, yb)``: g = grad_theta loss and the fresh leaves it was computed
        from (``xb``/``yb`` require grad only when ``need_x``/``need_y``). Call it under
        ``torch.enable_grad()`` (autograd-Function backwards run with grad disabled).
        """
        idx = self.batches[step]
        th = theta.detach().requires_grad_(True)
        xb = images[idx].detach().requires_grad_(need_x)
        yb = labels[idx].detach().requires_grad_(need_y)
        loss = self.inner_loss(th, self.aug.replay(xb, step), yb)
        (g,) = torch.autograd.grad(loss, th, create_graph=create_graph)
        return g, th, xb, yb

    def forward_unroll(self, images: Tensor, labels: Tensor, lr: Tensor, traj: Tensor | None):
        """Graph-free unroll of all N steps: returns (theta_k, G_k = sum_{i<k} g_i) at the
        matched step k (N, or ATT's k*, see :class:`_Closest`); fills ``traj[i] = theta_i``
        and sets :attr:`matched_step` (and :attr:`distances`)."""
        theta = self.start.clone()
        gsum = torch.zeros_like(theta)
        closest = _Closest(self) if self.match == "closest" else None
        for i, idx in enumerate(self.batches):
            if traj is not None:
                traj[i].copy_(theta)
            x = self.aug.sample_apply(images[idx])
            g = self.grad_no_graph(theta, x, labels[idx])
            gsum.add_(g)
            theta.sub_(lr * g)
            if closest is not None:
                closest.update(i + 1, theta, gsum)
        if closest is None:
            self.matched_step = len(self.batches)
            return theta, gsum
        return closest.finish()


class _Closest:
    """ATT's automatic trajectory length (Liu et al., ECCV 2024): track, without a graph
    and without a host synchronisation per step, the student step k in 1..N whose
    parameters are closest (L1, over the matched parameters) to the target; ties go to
    the later step, step 0 is never chosen."""

    def __init__(self, prob: _Problem) -> None:
        self.prob = prob
        self.dists: list[Tensor] = []
        self.best: Tensor | None = None
        self.best_k: Tensor | None = None
        self.theta: Tensor | None = None
        self.gsum: Tensor | None = None

    def update(self, k: int, theta: Tensor, gsum: Tensor | None = None) -> None:
        d = self.prob.distance(theta)
        self.dists.append(d)
        if self.best is None:
            self.best, self.best_k = d, torch.full((), k, device=d.device)
            self.theta = theta.detach().clone()
            self.gsum = None if gsum is None else gsum.clone()
            return
        better = d <= self.best  # ties to the later step
        self.best = torch.where(better, d, self.best)
        self.best_k = torch.where(better, torch.full_like(self.best_k, k), self.best_k)
        self.theta = torch.where(better, theta.detach(), self.theta)
        if gsum is not None:
            self.gsum = torch.where(better, gsum, self.gsum)

    def step(self) -> int:
        """k* (one host synchronisation); also sets the problem's matched_step/distances."""
        self.prob.matched_step = int(self.best_k)
        self.prob.distances = torch.stack(self.dists)
        return self.prob.matched_step

    def finish(self) -> tuple[Tensor, Tensor | None]:
        self.step()
        return self.theta, self.gsum


def _scalar_lr(syn_lr: Tensor, dtype: torch.dtype) -> Tensor:
    return syn_lr.reshape(()).to(dtype)


# ------------------------------------------------------------------ autograd functions


def _unroll_and_save(
    ctx: Any, images: Tensor, labels: Tensor, syn_lr: Tensor, prob: _Problem, keep_trajectory: bool
) -> Tensor:
    """Shared forward of the recompute/tesla Functions: graph-free unroll, loss D^-1 ||diff||^2.

    Saves ``(images, labels, syn_lr, aux, diff)`` with diff = theta_k - target on the matched
    parameters (k = N, or ATT's k*) and aux the trajectory theta_0..theta_{N-1}
    (``keep_trajectory``, recompute) or G_k = sum_{i<k} g_i (tesla).
    """
    lr = _scalar_lr(syn_lr.detach(), images.dtype)
    traj = images.new_empty(len(prob.batches), prob.spec.total) if keep_trajectory else None
    theta_k, gsum = prob.forward_unroll(images.detach(), labels.detach(), lr, traj)
    diff = prob.masked(theta_k - prob.target)
    ctx.prob = prob
    ctx.save_for_backward(images, labels, syn_lr, traj if keep_trajectory else gsum, diff)
    return diff.square().sum() / prob.denom


def _zero_input_grads(
    images: Tensor, labels: Tensor, need_x: bool, need_y: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Zero accumulators for dL/dimages and dL/dlabels (None where not needed)."""
    gx = torch.zeros_like(images) if need_x else None
    gy = torch.zeros_like(labels) if need_y else None
    return gx, gy


class _RecomputeMatching(torch.autograd.Function):
    """Exact matching-loss gradient by reverse-mode adjoints over recomputed steps."""

    @staticmethod
    def forward(ctx, images: Tensor, labels: Tensor, syn_lr: Tensor, prob: _Problem) -> Tensor:
        return _unroll_and_save(ctx, images, labels, syn_lr, prob, keep_trajectory=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        images, labels, syn_lr, traj, diff = ctx.saved_tensors
        prob: _Problem = ctx.prob
        need_x, need_y, need_lr = ctx.needs_input_grad[:3]
        lr = _scalar_lr(syn_lr.detach(), images.dtype)
        gx, gy = _zero_input_grads(images, labels, need_x, need_y)
        lam = diff * (2.0 / prob.denom) * grad_loss.to(diff.dtype)
        glr = torch.zeros((), dtype=diff.dtype, device=diff.device)
        # the loss depends on the first k steps only (k = N, or ATT's k*): start there
        for i in reversed(range(prob.matched_step)):
            idx = prob.batches[i]
            with torch.enable_grad(), prob.autocast():
                keep = i > 0 or need_x or need_y
                g, th, xb, yb = prob.replay_step(
                    i, traj[i], images, labels, need_x, need_y, create_graph=keep
                )
                # lambda_0 = dL/dstart is not needed (start is data): skip that VJP at i = 0
                inputs = (
                    ([th] if i > 0 else []) + ([xb] if need_x else []) + ([yb] if need_y else [])
                )
                vjp = [None] if i == 0 else []
                if inputs:
                    vjp += torch.autograd.grad(g, inputs, grad_outputs=lam, allow_unused=True)
            if need_lr:
                glr -= torch.dot(lam, g.detach())
            k = 1
            if need_x:
                if vjp[k] is not None:
                    gx.index_add_(0, idx, vjp[k] * -lr)
                k += 1
            if need_y and vjp[k] is not None:
                gy.index_add_(0, idx, vjp[k] * -lr)
            if vjp[0] is not None:
                lam = lam - lr * vjp[0]
        glr_out = glr.reshape(syn_lr.shape).to(syn_lr) if need_lr else None
        return gx, gy, glr_out, None


class _TeslaMatching(torch.autograd.Function):
    """TESLA constant-memory approximation (drops cross-step terms; docs/method.md, 'TESLA
    approximation')."""

    @staticmethod
    def forward(ctx, images: Tensor, labels: Tensor, syn_lr: Tensor, prob: _Problem) -> Tensor:
        return _unroll_and_save(ctx, images, labels, syn_lr, prob, keep_trajectory=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        images, labels, syn_lr, gsum, diff = ctx.saved_tensors
        prob: _Problem = ctx.prob
        need_x, need_y, need_lr = ctx.needs_input_grad[:3]
        lr = _scalar_lr(syn_lr.detach(), images.dtype)
        gx, gy = _zero_input_grads(images, labels, need_x, need_y)
        scale = (2.0 / prob.denom) * grad_loss.to(diff.dtype)
        glr = None
        if need_lr:
            glr = (-scale * torch.dot(diff, gsum)).reshape(syn_lr.shape).to(syn_lr)
        if need_x or need_y:
            c = -lr * scale * diff  # dL/dg_i, the same for every step
            theta = prob.start.clone()
            for i, idx in enumerate(prob.batches[: prob.matched_step]):
                with torch.enable_grad(), prob.autocast():
                    g, _, xb, yb = prob.replay_step(
                        i, theta, images, labels, need_x, need_y, create_graph=True
                    )
                    inputs = ([xb] if need_x else []) + ([yb] if need_y else [])
                    vjp = torch.autograd.grad(g, inputs, grad_outputs=c, allow_unused=True)
                if need_x and vjp[0] is not None:
                    gx.index_add_(0, idx, vjp[0])
                if need_y and vjp[-1] is not None:
                    gy.index_add_(0, idx, vjp[-1])
                theta.sub_(lr * g.detach())
        return gx, gy, glr, None


# ------------------------------------------------------------------------ public API


def trajectory_matching_loss(
    model: nn.Module,
    start: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor | float,
    batches: Sequence[Tensor],
    augment: Any = None,
    mode: str = "full",
    *,
    loss: str | LossFn = "auto",
    generator: torch.Generator | None = None,
    param_mask: Tensor | None = None,
    match: str = "last",
) -> Tensor:
    """Normalised trajectory-matching loss ||theta_k - target||^2 / ||start - target||^2.

    MTT (Cazenavette et al., CVPR 2022, eq. 2-3); docs/method.md, 'Matching loss'.
    ``model`` is used only as a function through :func:`torch.func.functional_call` with
    weights ``ParamSpec.of(model).unflatten(theta)``; its own parameters are neither read
    nor modified. Networks with running statistics (BatchNorm) are refused.

    The unroll must be deterministic for ``"recompute"``/``"tesla"`` to be exact (no
    dropout in training mode; augmentation replayed through ``sample``/``apply``).

    Args:
        model: the student architecture (no BatchNorm running statistics, deterministic).
        start: flat expert snapshot theta_0 [P] (data: no gradient flows into it).
        target: flat expert snapshot theta* [P], M epochs after ``start``.
        images: synthetic pixels [N, ...] (may require grad). Sets the dtype/device.
        labels: [N] int64 class ids (cross-entropy) or [N, K] float logits (soft
            cross-entropy against softmax(labels), DATM; may require grad).
        syn_lr: the student's step size, a one-element tensor (may require grad).
        batches: one 1-D index tensor per inner step (see :func:`sample_minibatches`).
        augment: None; a DSA-like object with ``sample(x, generator)`` and
            ``apply(x, params)`` (sampled once per step, replayed exactly by the
            recompute/tesla backward); or any deterministic callable ``augment(x)``.
        mode: ``"full"`` (graph kept, exact), ``"recompute"`` (exact, activation memory
            independent of the number of steps) or ``"tesla"`` (constant memory,
            approximate gradients: cross-step terms dropped, see the module docstring).
        loss: ``"auto"`` (:func:`classification_loss`) or a callable ``(logits, labels)``.
        generator: random generator handed to ``augment.sample``.
        param_mask: PAD's parameter selection (Li et al., 2024): a boolean tensor [P] over
            the flat parameters; the loss is taken over the masked entries only, the same
            mask in numerator and denominator (see :func:`parameter_mask`). None: all.
        match: ``"last"`` (theta_k = theta_N, the student's last step) or ``"closest"``
            (ATT, Liu et al., ECCV 2024: the step k* in 1..N closest to the target in L1
            over the matched parameters, ties to the later step; the gradient flows
            through the first k* steps only; see :func:`trajectory_matching`).

    Returns:
        A scalar tensor; ``.backward()`` fills the gradients of ``images``, ``labels`` and
        ``syn_lr`` (those requiring grad) in every mode, also inside a larger graph.
    """
    return trajectory_matching(
        model, start, target, images, labels, syn_lr, batches, augment, mode, loss=loss,
        generator=generator, param_mask=param_mask, match=match,
    ).loss


def trajectory_matching(
    model: nn.Module,
    start: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor | float,
    batches: Sequence[Tensor],
    augment: Any = None,
    mode: str = "full",
    *,
    loss: str | LossFn = "auto",
    generator: torch.Generator | None = None,
    param_mask: Tensor | None = None,
    match: str = "last",
) -> MatchResult:
    """:func:`trajectory_matching_loss` with the matched step: a :class:`MatchResult`.

    With ``match="closest"`` (ATT) all N steps are unrolled; after each step k = 1..N the
    distance D_k = sum |theta_k - target| (over the matched parameters) is taken without a
    graph, k* = the last argmin, and the loss is ||theta_{k*} - target||^2 / ||start -
    target||^2. k* is piecewise constant in the inputs, so the gradient is the gradient of
    the k*-step unroll: ``"full"`` backpropagates from theta_{k*} only, ``"recompute"``
    starts its reverse pass at step k* (it never replays a later step), and ``"tesla"``
    applies its approximation to the first k* steps (G = sum_{i<k*} g_i), which is what
    TESLA computes for a k*-step unroll.
    """
    if mode not in MATCHING_MODES:
        raise InputError(
            f"trajectory_matching_loss: mode={mode!r}, expected one of {MATCHING_MODES}"
        )
    if match not in MATCH_RULES:
        raise InputError(
            f"trajectory_matching_loss: match={match!r}, expected one of {MATCH_RULES}"
        )
    prob, images, labels, syn_lr = _prepare(
        model, start, target, images, labels, syn_lr, batches, augment, loss, generator,
        param_mask, match,
    )
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (images, labels, syn_lr))
    if not wants_grad:
        with torch.no_grad():
            lr = _scalar_lr(syn_lr, images.dtype)
            theta_k, _ = prob.forward_unroll(images.detach(), labels.detach(), lr, None)
            value = prob.matching_value(theta_k)
    elif mode == "full":
        value = _full_unroll(prob, images, labels, syn_lr)
    elif mode == "recompute":
        value = _RecomputeMatching.apply(images, labels, syn_lr, prob)
    else:
        value = _TeslaMatching.apply(images, labels, syn_lr, prob)
    return MatchResult(value, prob.matched_step, prob.distances)


def _full_unroll(prob: _Problem, images: Tensor, labels: Tensor, syn_lr: Tensor) -> Tensor:
    """Reference semantics: unroll with create_graph, one flat theta per step."""
    lr = _scalar_lr(syn_lr, images.dtype)
    theta = prob.start.detach().requires_grad_(True)
    closest = _Closest(prob) if prob.match == "closest" else None
    thetas = []
    for idx in prob.batches:
        x = prob.aug.sample_apply(images[idx])
        (g,) = torch.autograd.grad(prob.inner_loss(theta, x, labels[idx]), theta, create_graph=True)
        theta = theta - lr * g
        if closest is not None:
            thetas.append(theta)
            closest.update(len(thetas), theta)
    if closest is None:
        prob.matched_step = len(prob.batches)
    else:  # backpropagate from theta_{k*}: the later steps' graphs are dropped unused
        theta = thetas[closest.step() - 1]
    return prob.matching_value(theta)


def parameter_mask(
    model: nn.Module | ParamSpec,
    *,
    drop_ratio: float | None = None,
    layers: Sequence[str] | None = None,
) -> Tensor:
    """PAD's parameter selection (Li et al., 2024) as a boolean mask over the flat parameters.

    - ``drop_ratio=a``: flatten the parameters in registration order (shallow to deep) and
      keep the indices [floor(a * P), P): the shallowest fraction a is dropped. The cut
      counts parameters, not layers (it may fall inside a tensor), as PAD does.
    - ``layers=[...]``: keep the parameters whose name equals an entry or lies below it as
      a module path (``"classifier"`` keeps ``classifier.weight`` and ``classifier.bias``).

    Exactly one of the two must be given. docs/method.md, "Parameter selection (PAD)".
    """
    spec = model if isinstance(model, ParamSpec) else ParamSpec.of(model)
    if (drop_ratio is None) == (layers is None):
        raise InputError("parameter_mask: give exactly one of drop_ratio and layers")
    total = spec.total
    if drop_ratio is not None:
        a = float(drop_ratio)
        if not 0.0 <= a < 1.0:
            raise InputError(f"parameter_mask: drop_ratio must be in [0, 1), got {drop_ratio}")
        mask = torch.zeros(total, dtype=torch.bool)
        mask[math.floor(a * total):] = True
        return mask
    if isinstance(layers, str):
        layers = [layers]
    keep = [False] * len(spec.names)
    for entry in layers:
        hits = [i for i, n in enumerate(spec.names) if n == entry or n.startswith(entry + ".")]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in spec.names})
            raise InputError(
                f"parameter_mask: {entry!r} names no parameter of this model; parameter names "
                f"are {list(spec.names)} (modules: {modules})"
            )
        for i in hits:
            keep[i] = True
    return torch.cat(
        [torch.full((n,), k, dtype=torch.bool) for n, k in zip(spec.numels, keep, strict=True)]
    )


def _prepare(
    model, start, target, images, labels, syn_lr, batches, augment, loss, generator,
    param_mask=None, match="last",
):
    name = "trajectory_matching_loss"
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
    if has_running_stats(model):
        raise InputError(
            f"{name}: the model keeps BatchNorm running statistics, which the functional inner "
            "loop cannot update correctly; use a network without them (e.g. ConvNet with "
            "norm='instancenorm', or BatchNorm with track_running_stats=False)"
        )
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() < 2:
        raise InputError(f"{name}: images must be a floating tensor [N, ...]")
    dtype, device = images.dtype, images.device
    n = images.shape[0]
    if not torch.is_tensor(labels):
        raise InputTypeError(f"{name}: labels must be a tensor ([N] class ids or [N, K] logits)")
    if labels.shape[0] != n:
        raise InputError(
            f"{name}: labels have {labels.shape[0]} rows but images have {n}; pass one label "
            "per synthetic image"
        )
    if labels.is_floating_point():
        if labels.dim() != 2:
            raise InputError(
                f"{name}: soft labels must be [N, K] logits, got {tuple(labels.shape)}"
            )
    elif labels.dim() != 1:
        raise InputError(f"{name}: hard labels must be [N] class ids, got {tuple(labels.shape)}")
    if labels.device != device:
        raise InputError(
            f"{name}: labels are on {labels.device} but images on {device}; put both on the "
            "same device"
        )
    spec = ParamSpec.of(model)
    for what, vec in (("start", start), ("target", target)):
        if not torch.is_tensor(vec) or vec.dim() != 1 or vec.numel() != spec.total:
            shape = tuple(vec.shape) if torch.is_tensor(vec) else type(vec).__name__
            raise InputError(
                f"{name}: {what} must be a flat parameter vector [{spec.total}] for this model "
                f"(named_parameters order), got {shape}"
            )
    start = start.detach().to(device=device, dtype=dtype)
    target = target.detach().to(device=device, dtype=dtype)
    if param_mask is not None:
        if (
            not torch.is_tensor(param_mask)
            or param_mask.dtype != torch.bool
            or param_mask.shape != (spec.total,)
        ):
            shape = tuple(param_mask.shape) if torch.is_tensor(param_mask) else param_mask
            raise InputError(
                f"{name}: param_mask must be a boolean tensor [{spec.total}] over the flat "
                f"parameters (see parameter_mask), got {shape}"
            )
        if not bool(param_mask.any()):
            raise InputError(f"{name}: param_mask selects no parameter")
        param_mask = to_device(param_mask, device)
    if not torch.is_tensor(syn_lr):
        syn_lr = torch.tensor(float(syn_lr), dtype=dtype, device=device)
    if syn_lr.numel() != 1 or not syn_lr.is_floating_point():
        raise InputError(f"{name}: syn_lr must be a one-element floating tensor")
    if len(batches) == 0:
        raise InputError(f"{name}: batches is empty; pass one index tensor per inner step")
    idxs = []
    for i, b in enumerate(batches):
        b = torch.as_tensor(b)
        if b.dim() != 1 or b.numel() == 0 or b.is_floating_point() or b.dtype == torch.bool:
            raise InputError(f"{name}: batches[{i}] must be a non-empty 1-D integer index tensor")
        idxs.append(b.long())
    # validate where the indices are (CPU batches: no GPU sync), then move all at once
    flat = torch.cat([b.to(idxs[0].device) for b in idxs])
    lo, hi = torch.aminmax(flat)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        raise InputError(f"{name}: batch indices span [{lo}, {hi}] but there are {n} images")
    idxs = list(to_device(flat, device).split([b.numel() for b in idxs]))
    if loss == "auto":
        loss_fn = classification_loss
    elif callable(loss):
        loss_fn = loss
    else:
        raise InputError(f"{name}: loss must be 'auto' or a callable (logits, labels) -> scalar")
    prob = _Problem(
        model=model,
        spec=spec,
        loss_fn=loss_fn,
        batches=idxs,
        start=start,
        target=target,
        aug=_Augmenter(augment, generator),
        mask=param_mask,
        match=match,
        autocast=_Autocast.capture(device),
    )
    if not prob.denom > 0:
        where = "on the masked parameters " if param_mask is not None else ""
        raise InputError(
            f"{name}: start and target coincide {where}(||start - target||^2 = {prob.denom})"
        )
    return prob, images, labels, syn_lr


# ----------------------------------------------------------------- window and batches


def window_upper_bound(
    iteration: int,
    min_start_epoch: int,
    current_max_start_epoch: int,
    max_start_epoch: int,
    expansion_end: int,
    sequential: bool = True,
) -> int:
    """Exclusive upper bound UB of the start-epoch window (DATM, Guo et al., ICLR 2024;
    docs/method.md, 'Matching window').

    UB = min(T+, T + floor((T+ - T) * it / expansion_end)) with sequential generation, else
    T+; T- = ``min_start_epoch``, T = ``current_max_start_epoch``, T+ = ``max_start_epoch``.
    """
    _check_window(
        iteration,
        min_start_epoch,
        current_max_start_epoch,
        max_start_epoch,
        expansion_end,
        sequential,
    )
    if not sequential:
        return max_start_epoch
    t, tp = current_max_start_epoch, max_start_epoch
    return min(tp, t + (tp - t) * iteration // expansion_end)


def sample_start_epoch(
    iteration: int,
    min_start_epoch: int,
    current_max_start_epoch: int,
    max_start_epoch: int,
    expansion_end: int,
    sequential: bool = True,
    generator: torch.Generator | None = None,
) -> int:
    """Start epoch t ~ uniform{T-, ..., UB - 1} with UB from :func:`window_upper_bound`."""
    ub = window_upper_bound(
        iteration,
        min_start_epoch,
        current_max_start_epoch,
        max_start_epoch,
        expansion_end,
        sequential,
    )
    dev = None if generator is None else generator.device
    return int(torch.randint(min_start_epoch, ub, (1,), generator=generator, device=dev))


def _check_window(it, t_min, t_cur, t_max, expansion_end, sequential):
    where = "matching window"
    if it < 0:
        raise InputError(f"{where}: iteration must be >= 0, got {it}")
    if t_min < 0:
        raise InputError(f"{where}: min_start_epoch must be >= 0, got {t_min}")
    if t_max <= t_min:
        raise InputError(
            f"{where}: max_start_epoch ({t_max}) must exceed min_start_epoch ({t_min})"
        )
    if sequential:
        if not t_min < t_cur <= t_max:
            raise InputError(
                f"{where}: need min_start_epoch < current_max_start_epoch <= max_start_epoch, "
                f"got {t_min}, {t_cur}, {t_max}"
            )
        if expansion_end <= 0:
            raise InputError(f"{where}: expansion_end must be > 0, got {expansion_end}")


def sample_minibatches(
    num_images: int,
    batch_size: int,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Index tensors for ``steps`` inner steps (docs/method.md, 'Matching loss', step 2).

    Consecutive chunks of ``batch_size`` from a fresh random permutation of
    ``range(num_images)``; a new permutation is drawn when one is exhausted (its last
    chunk is shorter when ``batch_size`` does not divide ``num_images``). Drawn on the
    generator's device, then moved to ``device`` (if given) in one copy.
    """
    if num_images <= 0 or batch_size <= 0 or steps <= 0:
        raise InputError(
            f"sample_minibatches: num_images ({num_images}), batch_size ({batch_size}) and "
            f"steps ({steps}) must be positive"
        )
    src = None if generator is None else generator.device
    out: list[Tensor] = []
    chunks: list[Tensor] = []
    while len(out) < steps:
        if not chunks:
            perm = torch.randperm(num_images, generator=generator, device=src)
            chunks = list(perm.split(batch_size))
            chunks.reverse()
        out.append(chunks.pop())
    if device is None:
        return out
    return list(to_device(torch.cat(out), device).split([b.numel() for b in out]))
