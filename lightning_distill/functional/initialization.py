"""How a synthetic set starts: real images per class and DATM's soft labels (pure torch).

DATM (Guo et al., ICLR 2024; docs/method.md, "Soft labels and initialisation"):

- **Image init "samples_predicted_correctly"**: per class, scan a random permutation of
  its real training images and keep the first ``ipc`` that an expert (its final
  snapshot) classifies correctly. When the first expert classifies fewer than ``ipc``
  images of a class correctly, DATM goes on to the next expert before giving up; here
  the experts are tried in the given order and the first one that classifies ``ipc``
  images of the class correctly supplies them all. If none does, the expert with the
  most correct images supplies those and the rest are filled with misclassified images
  (in permutation order, with a warning).
- **Image init "real"**: the first ``ipc`` images of each class's permutation.
- **Soft labels**: for every synthetic image, the mean of the raw logits of the experts
  that classify it correctly (DATM averages over every expert of its buffers); an image
  no expert classifies correctly gets the mean over all of them (with a warning).

The experts are reached through ``logits_fn(expert, images) -> logits`` so these functions
know nothing of stores, devices or modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["class_permutations", "correct_sample_indices", "soft_label_logits"]

LogitsFn = Callable[[int, Tensor], Tensor]


def class_permutations(
    labels: Tensor, num_classes: int, ipc: int, generator: torch.Generator
) -> list[Tensor]:
    """Per class c, its training indices in a random order (one ``randperm`` per class,
    classes in order, all from ``generator``); refuses a class with fewer than ``ipc``."""
    perms = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise InputError(
                f"ipc={ipc} but class {c} has only {idx.numel()} training images; lower ipc"
            )
        perms.append(idx[torch.randperm(idx.numel(), generator=generator)])
    return perms


def _first_correct(
    images: Tensor, perm: Tensor, c: int, k: int, expert: int, logits_fn: LogitsFn,
    chunk: int,
) -> Tensor:
    """The first (up to) k indices of ``perm`` that ``expert`` classifies as class c."""
    keep: list[Tensor] = []
    found = 0
    for s in range(0, perm.numel(), chunk):
        part = perm[s : s + chunk]
        good = part[logits_fn(expert, images[part]).argmax(1).to(part.device) == c]
        keep.append(good)
        found += good.numel()
        if found >= k:
            break
    return torch.cat(keep)[:k]


def correct_sample_indices(
    images: Tensor,
    perm: Tensor,
    c: int,
    k: int,
    experts: Sequence[int],
    logits_fn: LogitsFn,
    chunk: int = 256,
) -> tuple[Tensor, int]:
    """DATM's correct-sample initialisation for class ``c``: ``k`` indices from ``perm``.

    Returns ``(indices, expert)``: the first k images of ``perm`` that ``experts[j]``
    classifies correctly, for the first j that has k of them. Without one, the expert
    with the most correct images is used and the rest filled with misclassified images.
    """
    if not experts:
        raise InputError("correct_sample_indices: no experts given")
    best, best_expert = None, experts[0]
    for e in experts:
        good = _first_correct(images, perm, c, k, e, logits_fn, chunk)
        if good.numel() == k:
            return good, e
        if best is None or good.numel() > best.numel():
            best, best_expert = good, e
    warnings.warn(
        f"samples_predicted_correctly: no expert classifies {k} images of class {c} correctly "
        f"(at most {best.numel()}, expert {best_expert}, of {len(experts)} tried); filling "
        "with misclassified ones",
        stacklevel=3,
    )
    rest = perm[~torch.isin(perm, best)][: k - best.numel()]
    return torch.cat([best, rest]), best_expert


def soft_label_logits(
    images: Tensor, class_ids: Tensor, experts: Sequence[int], logits_fn: LogitsFn,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DATM's soft labels: per image, the mean raw logits of the experts that classify it
    as ``class_ids``; the mean over all experts for an image that none classifies right."""
    if not experts:
        raise InputError("soft_label_logits: no experts given")
    class_ids = class_ids.cpu()
    total = count = fallback = None
    for e in experts:
        logits = logits_fn(e, images).to("cpu", dtype)
        if total is None:
            total = torch.zeros_like(logits)
            fallback = torch.zeros_like(logits)
            count = torch.zeros(logits.shape[0], 1, dtype=dtype)
        ok = (logits.argmax(1) == class_ids).unsqueeze(1).to(dtype)
        total += logits * ok
        count += ok
        fallback += logits
    none = count.squeeze(1) == 0
    if none.any():
        warnings.warn(
            f"soft label init: {int(none.sum())} image(s) are classified correctly by no "
            "expert; using the mean over all experts",
            stacklevel=3,
        )
    return torch.where(none.unsqueeze(1), fallback / len(experts), total / count.clamp_min(1))
