"""The synthetic sets of the reference scripts: reading and writing their file layout.

The distill scripts of MTT (Cazenavette et al.), DATM (Guo et al.) and PAD (Li et al.)
save a synthetic set as loose tensor files in one directory (docs/formats.md,
'Reference scripts' synthetic sets'):

- ``images_<tag>.pt``: float [N, C, H, W] in the training input space (normalised, or
  ZCA-whitened where the run used ZCA);
- ``labels_<tag>.pt``: int64 [N] class ids (MTT: hard labels) or float [N, K] logits
  (DATM / PAD: soft labels, the target is their softmax);
- ``lr_<tag>.pt``: the learned step size syn_lr, a 0-dim tensor (DATM / PAD; some forks
  save a Python float). MTT saves none: the step size is given by the user, or read
  from a ``syn_lr_<tag>.pt`` where a fork saved one;

with ``<tag>`` ``best`` (the set of the best evaluation) or an iteration number. DATM
and PAD write them into a ``Normal`` subdirectory of the run's directory; either
directory may be named. ``images_zca_<tag>.pt`` (the inverse-ZCA pixels some runs also
save) is not read.

This module reads and writes the layout as tensors (:func:`read_reference`,
:func:`write_reference`) and checks a set against the data it is to be used with
(:func:`check_reference`, :func:`check_space`); :class:`~lightning_distill.data.SyntheticSet`
(``from_reference`` / ``to_reference``) builds on it. Every refusal is one line naming
the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DataFormatError, InputError, MissingFileError
from ..io import atomic_save, atomic_write_json

__all__ = [
    "ReferenceSet",
    "check_reference",
    "check_space",
    "hard_labels",
    "read_reference",
    "reference_tags",
    "space_statistics",
    "write_reference",
]

#: the name of the metadata file :func:`write_reference` adds (the reference scripts
#: ignore it; :func:`read_reference` restores the set's ``meta`` from it)
META_FILE = "meta_{tag}.json"
_TAG = re.compile(r"^images_(best|\d+)\.pt$")


@dataclass
class ReferenceSet:
    """What one tag of a reference directory holds: ``images``, ``labels``, ``lr`` (None
    when no file gives it), the ``files`` read, where ``lr`` came from and the ``meta``
    of a file written by :func:`write_reference` (``{}`` otherwise)."""

    directory: Path
    tag: str
    images: Tensor
    labels: Tensor
    lr: float | None
    files: list[str] = field(default_factory=list)
    lr_source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _directory(path: str | os.PathLike) -> Path:
    """The directory holding the tensor files: ``path``, or its ``Normal`` subdirectory
    (DATM / PAD) when only that one holds ``images_*.pt``."""
    d = Path(path)
    if not d.exists():
        raise MissingFileError(f"reference set directory {d} does not exist; pass the "
                               "directory a distill script saved its images_*.pt files in")
    if not d.is_dir():
        raise InputError(f"{d} is a file; pass the directory holding images_<tag>.pt, "
                         "labels_<tag>.pt (and lr_<tag>.pt)")
    if not reference_tags(d) and (d / "Normal").is_dir() and reference_tags(d / "Normal"):
        return d / "Normal"
    return d


def reference_tags(directory: str | os.PathLike) -> list[str]:
    """The tags of the ``images_<tag>.pt`` files in ``directory``: ``best`` first, then
    the iterations in increasing order."""
    names = [m.group(1) for p in Path(directory).glob("images_*.pt")
             if (m := _TAG.match(p.name))]
    return sorted(names, key=lambda t: (t != "best", int(t) if t.isdigit() else -1))


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure becomes one clear error
        raise DataFormatError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}; "
                              "the file is damaged or not a torch tensor file") from e


def _lr_value(value: Any, path: Path) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise DataFormatError(f"{path}: the step size must be one number, found a tensor "
                                  f"of shape {tuple(value.shape)}")
        value = value.detach().double().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(f"{path}: the step size must be a number or a one-element "
                              f"tensor, found {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise DataFormatError(f"{path}: the step size is {value}; it must be a finite "
                              "positive number (pass lr= to give one yourself)")
    return float(value)


def read_reference(path: str | os.PathLike, iteration: str | int = "best",
                   lr: float | None = None) -> ReferenceSet:
    """Read ``images_<tag>.pt``, ``labels_<tag>.pt`` and the step size of one tag.

    ``iteration``: ``"best"`` or an iteration number. ``lr``: the step size; when None it
    is read from ``lr_<tag>.pt`` (DATM, PAD), else ``syn_lr_<tag>.pt`` (forks of MTT),
    and stays None when neither exists. The tensors are checked for their kind and
    shape here (:func:`check_reference` checks them against the data)."""
    d = _directory(path)
    tag = str(iteration)
    if tag != "best" and not tag.isdigit():
        raise InputError(f"iteration must be 'best' or an iteration number, got {iteration!r}")
    images_path, labels_path = d / f"images_{tag}.pt", d / f"labels_{tag}.pt"
    if not images_path.is_file():
        tags = reference_tags(d)
        have = (f"the directory holds the tags {', '.join(tags)}" if tags
                else "the directory holds no images_<tag>.pt")
        raise MissingFileError(f"{images_path} does not exist ({have}); pass --iteration "
                               "with one of them, or the directory a distill script wrote")
    if not labels_path.is_file():
        raise MissingFileError(f"{labels_path} does not exist: every images_{tag}.pt needs "
                               f"its labels; copy labels_{tag}.pt from the same run next to it")
    images, labels = _load(images_path), _load(labels_path)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataFormatError(f"{images_path}: expected a float tensor [N, C, H, W], found "
                              f"{shape}; pass the images file a distill script saved")
    if not isinstance(labels, Tensor):
        raise DataFormatError(f"{labels_path}: expected a tensor of labels, found "
                              f"{type(labels).__name__}")
    if labels.is_floating_point() and labels.dim() != 2 or \
            not labels.is_floating_point() and labels.dim() != 1:
        raise DataFormatError(
            f"{labels_path}: labels must be int64 class ids [N] or float logits [N, K], "
            f"found {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{labels_path}: {labels.shape[0]} labels for "
                              f"{images.shape[0]} images in {images_path.name}; both files "
                              "must come from the same iteration of the same run")
    files = [images_path.name, labels_path.name]
    source = "given" if lr is not None else None
    if lr is None:
        for name in (f"lr_{tag}.pt", f"syn_lr_{tag}.pt"):
            if (d / name).is_file():
                lr, source = _lr_value(_load(d / name), d / name), name
                files.append(name)
                break
    meta_path = d / META_FILE.format(tag=tag)
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataFormatError(f"{meta_path}: not valid JSON ({e}); delete it to import "
                                  "the tensors alone") from e
        files.append(meta_path.name)
    images = images.detach().requires_grad_(False)
    labels = labels.detach().requires_grad_(False)
    return ReferenceSet(d, tag, images, labels, lr, files, source, meta)


def hard_labels(labels: Tensor, num_classes: int | None = None) -> Tensor:
    """[N] int64 class ids of a set's labels: hard labels as they are; for soft labels
    ([N, K] logits) the class each image stands for. The reference scripts and our
    distillation order a set class by class (``ipc`` images of class 0, then of class 1,
    ...), and DD-Ranking gives a set's images these class-major hard labels, whatever the
    learned logits became: so do we when N = K * ipc; otherwise the logits' argmax."""
    if not labels.is_floating_point():
        return labels.long()
    n, k = int(labels.shape[0]), int(num_classes or labels.shape[1])
    if k and n % k == 0:
        return torch.arange(k).repeat_interleave(n // k)
    return labels.argmax(1)


def check_reference(ref: ReferenceSet, *, channels: int, image_size: Sequence[int],
                    num_classes: int) -> None:
    """Refuse a set that cannot be the data's: the image shape, the number of classes,
    hard labels out of range, NaN or inf pixels or logits; each one line naming the file."""
    images_name = ref.directory / f"images_{ref.tag}.pt"
    labels_name = ref.directory / f"labels_{ref.tag}.pt"
    want = (int(channels), *(int(s) for s in image_size))
    if tuple(ref.images.shape[1:]) != want:
        raise DataFormatError(
            f"{images_name}: images of shape {tuple(ref.images.shape[1:])} (C, H, W), but the "
            f"data set's are {want}; import it with the data set it was distilled from")
    for name, t in ((images_name, ref.images), (labels_name, ref.labels)):
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise DataFormatError(
                    f"{name}: {bad} NaN or inf value(s) of {t.numel()}: the run diverged; "
                    "import an earlier iteration (--iteration) or the best set")
    k = int(num_classes)
    if ref.labels.is_floating_point():
        if ref.labels.shape[1] != k:
            raise DataFormatError(
                f"{labels_name}: soft labels over {ref.labels.shape[1]} classes, but the data "
                f"set has {k}; import it with the data set it was distilled from")
    elif ref.labels.numel():
        lo, hi = int(ref.labels.min()), int(ref.labels.max())
        if lo < 0 or hi >= k:
            raise DataFormatError(
                f"{labels_name}: class ids {lo}..{hi} out of range for a data set of {k} "
                "classes (0.."f"{k - 1}); import it with the data set it was distilled from")


# ------------------------------------------------------------------ the input space
def space_statistics(images: Tensor) -> Tensor:
    """Per channel: the mean and the log of the standard deviation of ``images``
    ([N, C, H, W]), as a [2, C] float64 tensor."""
    x = images.detach().double().transpose(0, 1).reshape(images.shape[1], -1)
    return torch.stack([x.mean(1), x.std(1).clamp_min(1e-12).log()])


def _distance(a: Tensor, b: Tensor) -> float:
    """How far the statistics ``a`` are from ``b`` (each :func:`space_statistics`): the
    mean difference in units of ``b``'s standard deviation plus the log-std difference,
    averaged over the channels."""
    return float(((a[0] - b[0]).abs() / b[1].exp() + (a[1] - b[1]).abs()).mean())


#: the declared space is refused when another candidate space is at least this many
#: times closer to the images' statistics
SPACE_MARGIN = 3.0


def check_space(images: Tensor, candidates: Mapping[str, Tensor], declared: str,
                where: str, fix: str) -> None:
    """Refuse images whose statistics are clearly those of another input space.

    ``candidates`` maps a space's description (``"ZCA-whitened"``, ``"mean/std
    normalised"``, ``"[0, 1] pixels"``) to its :func:`space_statistics` on the real
    training images; ``declared`` is the space the user named. A reference file records
    no input space, so this is the only check possible: distilled images drift from
    their initialisation, but stay far closer to their own space's scale than to
    another's (ZCA-whitened CIFAR pixels have a standard deviation near 0.1, normalised
    ones near 1, raw pixels a mean near 0.5). The declared space is refused when another
    candidate is :data:`SPACE_MARGIN` times closer; ``fix`` says what to do."""
    stats = space_statistics(images)
    dist = {name: _distance(stats, ref) for name, ref in candidates.items()}
    best = min(dist, key=dist.__getitem__)
    if best != declared and dist[declared] > SPACE_MARGIN * dist[best]:
        mean = ", ".join(f"{v:.3g}" for v in stats[0].tolist())
        std = ", ".join(f"{v:.3g}" for v in stats[1].exp().tolist())
        raise DataFormatError(
            f"{where}: the images look {best} (per-channel mean {mean}, std {std}), but the "
            f"data are declared {declared}; {fix}")


# ------------------------------------------------------------------ writing
def write_reference(directory: str | os.PathLike, images: Tensor, labels: Tensor, lr: float,
                    *, tag: str = "best", meta: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> list[Path]:
    """Write ``images_<tag>.pt``, ``labels_<tag>.pt``, ``lr_<tag>.pt`` (DATM's layout: the
    reference evaluators and DD-Ranking read it) and, with ``meta``, ``meta_<tag>.json``
    into ``directory`` (created), each file atomically. ``lr`` is saved as a 0-dim
    float64 tensor, so that reading it back gives the same number. Files that exist are
    refused unless ``overwrite``; everything is checked before the first file is written.
    Returns the paths written."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise InputError(f"{d} is a file; name a directory to write the set into")
    tag = str(tag)
    names = [f"images_{tag}.pt", f"labels_{tag}.pt", f"lr_{tag}.pt"]
    if meta is not None:
        names.append(META_FILE.format(tag=tag))
    existing = [n for n in names if (d / n).exists()]
    if existing and not overwrite:
        raise InputError(f"{d}: {', '.join(existing)} exist(s); choose another directory or "
                         "pass --overwrite true")
    if not math.isfinite(float(lr)) or float(lr) <= 0:
        raise InputError(f"the set's lr is {lr}; it must be a finite positive number")
    text = None if meta is None else json.dumps(dict(meta), indent=2) + "\n"  # fails early
    d.mkdir(parents=True, exist_ok=True)
    paths = [atomic_save(images.detach().cpu().contiguous().clone(), d / names[0]),
             atomic_save(labels.detach().cpu().contiguous().clone(), d / names[1]),
             atomic_save(torch.tensor(float(lr), dtype=torch.float64), d / names[2])]
    if text is not None:
        paths.append(atomic_write_json(d / names[3], json.loads(text)))
    return paths


def _zca_statistics(pixels: Tensor, regularization: float) -> Tensor:
    """:func:`space_statistics` of ``pixels`` ([N, C, H, W] in [0, 1]) once ZCA-whitened
    with ``regularization``, without fitting the transform: the whitened training images
    have mean 0, and their total variance is sum_i s_i / (s_i + regularization) over the
    eigenvalues s_i of the pixel covariance (the nonzero ones: those of the N x N Gram
    matrix when N < D), spread evenly over the D values (ZCA whitens every direction
    alike)."""
    n, c = int(pixels.shape[0]), int(pixels.shape[1])
    x = pixels.detach().double().reshape(n, -1)
    x = x - x.mean(0)
    gram = x @ x.T if n <= x.shape[1] else x.T @ x
    s = torch.linalg.eigvalsh(gram / max(n - 1, 1)).clamp_min(0)
    var = float((s / (s + regularization)).sum()) / x.shape[1]
    return torch.stack([torch.zeros(c, dtype=torch.float64),
                        torch.full((c,), 0.5 * math.log(max(var, 1e-24)), dtype=torch.float64)])


def space_candidates(datamodule: Any, max_images: int = 2000
                     ) -> tuple[str, dict[str, Tensor]]:
    """``(declared, candidates)`` for :func:`check_space`: the statistics of (up to
    ``max_images``, a seeded draw of) the set-up ``datamodule``'s training images in its
    own input space, as raw [0, 1] pixels and in the other normalisation (mean/std
    normalised, or ZCA-whitened with the data module's regularisation,
    :func:`_zca_statistics`)."""
    from .splits import images_view

    x = images_view(datamodule.train_set)  # a streamed split: only the drawn rows are read
    if x.shape[0] > max_images:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_images]]
    elif not isinstance(x, Tensor):
        x = x[:]
    pixels = datamodule.from_input_space(x)
    zca_name, meanstd_name, pixels_name = "ZCA-whitened", "mean/std normalised", "[0, 1] pixels"
    declared = zca_name if datamodule.use_zca else meanstd_name
    out = {declared: space_statistics(x), pixels_name: space_statistics(pixels)}
    if datamodule.use_zca:
        out[meanstd_name] = space_statistics(datamodule.real.normalize(pixels))
    else:
        out[zca_name] = _zca_statistics(pixels, datamodule.zca_regularization)
    return declared, out
