"""Per-sample difficulty and PAD's easy-to-hard data selection for the experts (pure torch).

PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024) trains the expert
networks on a schedule of training subsets ordered by difficulty: the easiest samples of
every class first, harder ones added over the first epochs, and the easiest ones removed
late in training. Difficulty is the EL2N score (Paul et al., "Deep Learning on a Data
Diet", 2021) averaged over a few briefly trained networks.

EL2N of a sample ``(x, y)`` under a network ``f`` (higher = harder)::

    EL2N(x, y) = || softmax(f(x)) - onehot(y) ||_2

The schedule (:class:`PADSchedule`), for a class ``c`` with ``n_c`` training samples
ranked easiest first (lowest score first; equal scores in index order), at epoch ``e``
(0-based, the epoch being trained) with ``IR = initial_ratio``, ``AEE = add_end_epoch``,
``(rm1, rm2) = remove_epochs`` and ``(r1, r2) = remove_ratios``:

- ``e <= AEE``: the easiest ``floor(p * n_c)`` samples, ``p = min(1, IR + (1 - IR) * e / AEE)``
  (``p = 1`` when ``AEE = 0``); at ``e = AEE`` that is the whole class;
- ``AEE < e <= rm1``: all ``n_c`` samples;
- ``rm1 < e <= rm2``: all but the easiest ``floor(r1 * n_c)``;
- ``e > rm2``: all but the easiest ``floor(r2 * n_c)``.

So epoch ``rm1`` still trains on everything and ``rm1 + 1`` is the first epoch without the
easiest ``r1``; likewise ``rm2`` / ``rm2 + 1`` for ``r2`` (``r2`` is the total fraction
removed, not an extra one). The products are floored exactly: the ratios are taken as the
decimals they are written as (``Fraction(str(r))``), so ``floor(0.3 * 10) = 3`` and not the
2 that binary floating point would give. Every class uses its own ``n_c``. PAD's values
(CIFAR-10): IR 0.75, AEE 20, rm1 40, rm2 60, r1 0.1, r2 0.2; AEE 40 for CIFAR-100 and
Tiny ImageNet.

Example::

    scores = el2n_scores(logits, labels)            # one network; average several
    select = PADSelection(scores, labels, PADSchedule(add_end_epoch=20))
    idx = select(epoch)                             # sorted training-set indices
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = [
    "PADSchedule",
    "PADSelection",
    "class_difficulty_order",
    "el2n_scores",
    "pad_selection",
    "pad_subset_bounds",
    "pad_subset_sizes",
]


def el2n_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N per sample: ``|| softmax(logits_i) - onehot(labels_i) ||_2``, shape ``[N]``.

    Args:
        logits: ``[N, K]`` network outputs (any float dtype; computed in float32 or wider).
        labels: ``[N]`` class indices in ``0..K-1``.
    """
    if logits.dim() != 2:
        raise InputError(f"el2n_scores: logits must be [N, K], got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise InputError(
            f"el2n_scores: labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(dtype), dim=1)
    target = F.one_hot(labels.long(), logits.shape[1]).to(dtype)
    return torch.linalg.vector_norm(probs - target, dim=1)


def _ratio(value: float, name: str) -> Fraction:
    """``value`` as the exact decimal it is written as (``0.1`` -> 1/10)."""
    try:
        r = Fraction(str(value))
    except (ValueError, TypeError) as e:
        raise InputError(f"PADSchedule: {name} must be a number, got {value!r}") from e
    return r


@dataclass(frozen=True)
class PADSchedule:
    """PAD's easy-to-hard schedule (see the module docstring for the formula).

    Attributes:
        initial_ratio: IR, the fraction of each class (easiest first) trained on at epoch 0,
            in (0, 1].
        add_end_epoch: AEE, the epoch from which every sample is in (>= 0).
        remove_epochs: (rm1, rm2), ``AEE <= rm1 <= rm2``: after epoch rm1 the easiest
            fraction r1 of each class is dropped, after rm2 the easiest r2.
        remove_ratios: (r1, r2), ``0 <= r1 <= r2 < 1``.
    """

    initial_ratio: float = 0.75
    add_end_epoch: int = 20
    remove_epochs: tuple[int, int] = (40, 60)
    remove_ratios: tuple[float, float] = (0.1, 0.2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "remove_epochs", tuple(int(e) for e in self.remove_epochs))
        object.__setattr__(self, "remove_ratios", tuple(float(r) for r in self.remove_ratios))
        if len(self.remove_epochs) != 2 or len(self.remove_ratios) != 2:
            raise InputError(
                "PADSchedule: remove_epochs and remove_ratios take two values each "
                f"(rm1, rm2) and (r1, r2); got {list(self.remove_epochs)} and "
                f"{list(self.remove_ratios)}"
            )
        ir = _ratio(self.initial_ratio, "initial_ratio")
        if not 0 < ir <= 1:
            raise InputError(f"PADSchedule: initial_ratio must be in (0, 1], got "
                             f"{self.initial_ratio}")
        aee = int(self.add_end_epoch)
        rm1, rm2 = self.remove_epochs
        if not 0 <= aee <= rm1 <= rm2:
            raise InputError(
                "PADSchedule: need 0 <= add_end_epoch <= remove_epochs[0] <= remove_epochs[1]; "
                f"got add_end_epoch={self.add_end_epoch}, remove_epochs={list(self.remove_epochs)}"
            )
        r1, r2 = (_ratio(r, "remove_ratios") for r in self.remove_ratios)
        if not 0 <= r1 <= r2 < 1:
            raise InputError(
                f"PADSchedule: need 0 <= remove_ratios[0] <= remove_ratios[1] < 1; got "
                f"{list(self.remove_ratios)}"
            )

    def fraction_added(self, epoch: int) -> Fraction:
        """``p`` of epoch ``epoch`` (the kept fraction while samples are added), exact."""
        e = _check_epoch(epoch)
        aee = int(self.add_end_epoch)
        if aee == 0 or e >= aee:
            return Fraction(1)
        ir = _ratio(self.initial_ratio, "initial_ratio")
        return min(Fraction(1), ir + (1 - ir) * Fraction(e, aee))

    def bounds(self, n: int, epoch: int) -> tuple[int, int]:
        """``(start, stop)``: epoch ``epoch`` trains on ranks ``start..stop-1`` (0 = easiest)
        of a class of ``n`` samples."""
        n, e = int(n), _check_epoch(epoch)
        if n < 0:
            raise InputError(f"PADSchedule: a class size must be >= 0, got {n}")
        rm1, rm2 = self.remove_epochs
        if e <= self.add_end_epoch:
            return 0, math.floor(self.fraction_added(e) * n)
        if e <= rm1:
            return 0, n
        ratio = self.remove_ratios[0] if e <= rm2 else self.remove_ratios[1]
        return math.floor(_ratio(ratio, "remove_ratios") * n), n


def _check_epoch(epoch: int) -> int:
    e = int(epoch)
    if e < 0:
        raise InputError(f"PADSchedule: epoch must be >= 0 (0-based), got {epoch}")
    return e


def pad_subset_bounds(
    class_sizes: Sequence[int] | Tensor, epoch: int, schedule: PADSchedule | None = None
) -> Tensor:
    """``[C, 2]`` int64 ``(start, stop)`` per class: the ranks (easiest = 0) trained on at
    ``epoch``, each class with its own size."""
    schedule = schedule or PADSchedule()
    sizes = [int(n) for n in (class_sizes.tolist() if isinstance(class_sizes, Tensor)
                              else class_sizes)]
    return torch.tensor([schedule.bounds(n, epoch) for n in sizes], dtype=torch.long).view(-1, 2)


def pad_subset_sizes(
    class_sizes: Sequence[int] | Tensor, epoch: int, schedule: PADSchedule | None = None
) -> Tensor:
    """``[C]`` int64: how many samples of each class epoch ``epoch`` trains on."""
    b = pad_subset_bounds(class_sizes, epoch, schedule)
    return b[:, 1] - b[:, 0]


def class_difficulty_order(
    scores: Tensor, labels: Tensor, num_classes: int | None = None
) -> list[Tensor]:
    """Per class, its sample indices easiest first: ascending score, ties in index order."""
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise InputError(
            f"scores and labels must both be [N]; got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise InputError("difficulty scores contain NaN or Inf")
    labels = labels.long().cpu()
    scores = scores.cpu()
    k = int(labels.max()) + 1 if num_classes is None and labels.numel() else int(num_classes or 0)
    out = []
    for c in range(k):
        idx = torch.nonzero(labels == c).flatten()  # ascending index
        rank = torch.sort(scores[idx], stable=True).indices
        out.append(idx[rank])
    return out


def pad_selection(
    scores: Tensor,
    labels: Tensor,
    epoch: int,
    schedule: PADSchedule | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Sorted int64 indices of the samples epoch ``epoch`` trains on (see the module docstring).

    Args:
        scores: ``[N]`` difficulty, higher = harder (e.g. averaged :func:`el2n_scores`).
        labels: ``[N]`` class indices.
        epoch: 0-based epoch.
        schedule: the schedule (default :class:`PADSchedule()`, PAD's CIFAR-10 values).
        num_classes: number of classes (default ``labels.max() + 1``).
    """
    return PADSelection(scores, labels, schedule, num_classes)(epoch)


class PADSelection:
    """``epoch -> sorted training-set indices`` under a :class:`PADSchedule`: a pure function
    of the epoch (the per-class difficulty orders are computed once, here).

    Attributes:
        orders: per class, its indices easiest first (:func:`class_difficulty_order`).
        class_sizes: ``[C]`` int64.
    """

    def __init__(
        self,
        scores: Tensor,
        labels: Tensor,
        schedule: PADSchedule | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.schedule = schedule or PADSchedule()
        self.orders = class_difficulty_order(scores, labels, num_classes)
        self.class_sizes = torch.tensor([o.numel() for o in self.orders], dtype=torch.long)
        self.num_samples = int(labels.numel())

    def sizes(self, epoch: int) -> Tensor:
        """``[C]``: samples of each class at ``epoch``."""
        return pad_subset_sizes(self.class_sizes, epoch, self.schedule)

    def __call__(self, epoch: int) -> Tensor:
        bounds = pad_subset_bounds(self.class_sizes, epoch, self.schedule).tolist()
        parts = [o[a:b] for o, (a, b) in zip(self.orders, bounds, strict=True)]
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return torch.sort(torch.cat(parts)).values

    def __repr__(self) -> str:
        return (f"PADSelection(classes={len(self.orders)}, samples={self.num_samples}, "
                f"schedule={self.schedule})")
