"""Sharpness-aware updates: the SAM / ASAM / GSAM perturbation and gradient decomposition.

Pure torch on lists of tensors (one entry per parameter), no Lightning. The callbacks in
:mod:`lightning_distill.callbacks.sharpness` call these functions. The specification is
docs/method.md, 'Flat experts (FTD, GSAM)':

1. ``g = grad L(w)``
2. ``e = perturbation(w, g, rho, adaptive)``; ``w <- w + e``
3. ``g' = grad L(w + e)``
4. ``final = gsam_gradient(g, g', alpha)``
5. ``w <- w - e`` (restore), then the base optimizer steps with ``final``.

SAM (Foret et al., 2021) is the non-adaptive perturbation with ``alpha = 0``; ASAM
(Kwon et al., 2021) is the weight-adaptive perturbation with ``alpha = 0`` (with the
ASAM offset ``eta = 0``, as in FTD/DATM); GSAM (Zhuang et al., 2022), used by FTD and
DATM for their experts, is the weight-adaptive perturbation with ``alpha > 0``.
All norms and inner products are taken over all parameters jointly (the flattened
concatenation), never per tensor.

Groups of networks (:class:`~lightning_distill.functional.batched.StackedNetworks`):
with ``per_member=True`` every tensor carries a leading member dimension ``[K, ...]``
and each norm / inner product is taken per member (over all dimensions but the first,
jointly over the member's parameters), giving ``[K]`` values; the update of member k
is then exactly the update of a single network k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["global_norm", "gsam_gradient", "inner_product", "perturbation"]


def global_norm(tensors: Sequence[Tensor], per_member: bool = False) -> Tensor:
    """Euclidean norm of the concatenation of ``tensors`` (a 0-d tensor); with
    ``per_member``, one norm per member (leading dimension): a ``[K]`` tensor."""
    if len(tensors) == 0:
        raise InputError("global_norm: got an empty list of tensors")
    if per_member:
        parts = [torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors]
        return torch.linalg.vector_norm(torch.stack(parts, dim=1), dim=1)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def inner_product(a: Sequence[Tensor], b: Sequence[Tensor], per_member: bool = False) -> Tensor:
    """``<a, b>`` over the concatenation of the tensors (a 0-d tensor); with
    ``per_member``, one inner product per member (leading dimension): ``[K]``."""
    _check_lengths(a, b, "inner_product")
    if per_member:
        return torch.stack([(x * y).reshape(x.shape[0], -1).sum(dim=1)
                            for x, y in zip(a, b, strict=True)], dim=1).sum(dim=1)
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def _per(value: Tensor, like: Tensor, per_member: bool) -> Tensor:
    """``value`` ([K] per member, or 0-d) shaped to broadcast against ``like``."""
    return value.view(-1, *([1] * (like.dim() - 1))) if per_member else value


def perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    adaptive: bool,
    eps: float = 1e-12,
    per_member: bool = False,
) -> list[Tensor]:
    """Ascent step ``e`` added to the weights before the second pass (docs/method.md, 'Flat
    experts (FTD, GSAM)', step 2).

    - ``adaptive=False`` (SAM): ``e = rho * g / (||g|| + eps)``.
    - ``adaptive=True`` (ASAM / GSAM): ``n = || |w| * g ||_2`` and
      ``e = rho * w**2 * g / (n + eps)``, element-wise products.

    Norms run over all parameters jointly. ``params`` and ``grads`` are matching lists
    (``w`` and ``g``); the result is a new list of tensors shaped like ``params``. A zero
    gradient gives a zero perturbation. ``per_member``: norms per member (module
    docstring).
    """
    _check_lengths(params, grads, "perturbation")
    if rho < 0:
        raise InputError(f"perturbation: rho must be >= 0, got {rho}")
    with torch.no_grad():
        if adaptive:
            norm = global_norm([w.abs() * g for w, g in zip(params, grads, strict=True)],
                               per_member)
            scale = rho / (norm + eps)
            return [w * w * g * _per(scale, g, per_member)
                    for w, g in zip(params, grads, strict=True)]
        scale = rho / (global_norm(grads, per_member) + eps)
        return [g * _per(scale, g, per_member) for g in grads]


def gsam_gradient(
    g: Sequence[Tensor],
    g_prime: Sequence[Tensor],
    alpha: float,
    eps: float = 1e-12,
    per_member: bool = False,
) -> list[Tensor]:
    """GSAM's final gradient (Zhuang et al., ICLR 2022, Algorithm 1; docs/method.md, 'Flat experts
    (FTD, GSAM)', step 4).

    ``cos = <g, g'> / (||g|| ||g'|| + eps)``,
    ``g_perp = g - cos * ||g|| * g' / (||g'|| + eps)`` (the part of ``g`` orthogonal to
    ``g'``), and the result is ``g' - alpha * g_perp``. ``g`` is the gradient at ``w``,
    ``g_prime`` the gradient at the perturbed ``w + e``. With ``alpha == 0`` (SAM, ASAM)
    the tensors of ``g_prime`` are returned as they are (no copy, no arithmetic).
    ``per_member``: norms and inner products per member (module docstring).
    """
    _check_lengths(g, g_prime, "gsam_gradient")
    if alpha == 0:
        return list(g_prime)
    with torch.no_grad():
        norm_g = global_norm(g, per_member)
        norm_gp = global_norm(g_prime, per_member)
        cos = inner_product(g, g_prime, per_member) / (norm_g * norm_gp + eps)
        coef = cos * norm_g / (norm_gp + eps)
        return [gp - alpha * (gi - _per(coef, gp, per_member) * gp)
                for gi, gp in zip(g, g_prime, strict=True)]


def _check_lengths(a: Sequence[Tensor], b: Sequence[Tensor], where: str) -> None:
    if len(a) != len(b):
        raise InputError(f"{where}: the two tensor lists differ in length ({len(a)} vs {len(b)})")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise InputError(
                f"{where}: entry {i} has mismatched shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
