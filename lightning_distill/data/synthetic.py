"""SyntheticSet: a distilled data set on disk (docs/formats.md, section 'Synthetic set').

A synthetic set is the product of distillation and the input of evaluation:

- ``images`` [N, C, H, W] float, in the model's INPUT space (normalised, or ZCA
  whitened: docs/method.md, section 'ZCA whitening and normalisation'), so a network
  trains on them as they are;
- ``labels``: [N] int64 class ids (hard), or [N, K] float logits (DATM's soft labels;
  the training target is ``softmax(labels)``);
- ``lr``: the learned step size alpha (syn_lr), the evaluation learning rate
  (docs/method.md, section 'Evaluation protocol');
- ``meta``: plain metadata: ``dataset``, ``ipc``, ``num_classes``, ``channels``,
  ``image_size``, ``input_space`` (a dict naming the normalisation, e.g.
  ``{"dataset": "cifar10", "normalization": "zca", "zca_fingerprint": "..."}`` or
  ``{"normalization": "meanstd", "mean": [...], "std": [...]}``), ``source_store``,
  ``iteration``, ``created``, ...

File format (``format_version`` 1): ONE ``.pt`` file holding a plain dict, the
artifacts' header (``format`` "lightning_distill.SyntheticSet", ``format_version`` 1,
``library_version``, ``created``, ``input_space``; docs/formats.md) and
``{"kind": "lightning_distill.SyntheticSet", "images": Tensor, "labels": Tensor,
"lr": float, "meta": dict}`` (tensors and plain containers only, so
``torch.load(path, weights_only=True)`` reads it), written atomically, plus a PNG grid
next to it (same stem, ``.png``): one row per class, pixels from ``to_pixels`` (e.g.
de-normalisation or inverse ZCA) or a per-image min-max scaling.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..artifacts import check_header, header
from ..errors import DataFormatError, InputError, InputTypeError, MissingFileError
from ..io import atomic_open, atomic_save
from .input_space import InputSpace
from .reference_sets import (
    check_reference,
    hard_labels,
    read_reference,
    space_candidates,
    write_reference,
)
from .reference_sets import check_space as check_statistics

__all__ = [
    "FORMAT_VERSION",
    "SyntheticSet",
    "check_eval_data",
    "class_grid",
    "input_spaces_match",
]

#: version written by :meth:`SyntheticSet.save`; :meth:`SyntheticSet.load` reads <= this
FORMAT_VERSION = 1
_KIND = "lightning_distill.SyntheticSet"
_REQUIRED = ("images", "labels", "lr")


def _plain(value: Any, where: str) -> Any:
    """Convert metadata to tensors / plain containers (loadable with weights_only=True)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise InputTypeError(f"SyntheticSet meta{where}: key {k!r} must be a str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InputTypeError(
        f"SyntheticSet meta{where}: {type(value).__name__} cannot be stored in a weights_only "
        "file; use numbers, strings, lists, dicts or tensors"
    )


def input_spaces_match(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """:meth:`InputSpace.matches` for two input spaces or their dicts (None: unknown)."""
    return InputSpace.coerce(a).matches(b)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise InputError(f"image_size must be an int or (H, W), got {image_size!r}")
    return hw  # type: ignore[return-value]


def class_grid(
    images: Tensor,
    class_ids: Tensor,
    to_pixels: Callable[[Tensor], Tensor] | None = None,
    max_per_class: int | None = 10,
    *,
    num_classes: int | None = None,
    padding: int = 1,
    pad_value: float = 1.0,
    min_image_side: int = 1,
) -> Tensor:
    """A [3, H', W'] image grid in [0, 1], one row per class, images in set order.

    Pixels: ``to_pixels(images)`` clamped to [0, 1], or, without it, per-image min-max
    scaling (a constant image maps to 0). Grey images are repeated to RGB by ``make_grid``;
    images with neither 1 nor 3 channels show their first channel.

    Rows: the classes present in ``class_ids`` (sorted), or with ``num_classes`` every class
    0..max(num_classes, max id + 1) - 1 (a class without images is a blank row). A row holds
    at most ``max_per_class`` images (None: all); shorter rows are filled with black cells.
    With R rows of at most n [C, H, W] images and padding p (of value ``pad_value``),
    H' = R (H + p) + p and W' = n (W + p) + p.

    ``min_image_side``: each image is first enlarged by the smallest whole factor f that
    makes its shorter side at least this many pixels, by nearest neighbour (every pixel
    becomes an f x f block, so pixels stay pixels); H and W above are then f H and f W.
    An 8x8 digit needs f = 8 to be seen at 64 pixels.
    """
    from torchvision.utils import make_grid

    with torch.no_grad():
        x = images.detach().float().cpu()
        if to_pixels is not None:
            x = to_pixels(x).detach().float().cpu()
        else:
            flat = x.reshape(x.shape[0], -1)
            lo = flat.min(1).values.reshape(-1, 1, 1, 1)
            hi = flat.max(1).values.reshape(-1, 1, 1, 1)
            x = (x - lo) / (hi - lo).clamp_min(1e-12)
        x = x.clamp(0.0, 1.0)
        if x.shape[1] not in (1, 3):
            x = x[:, :1]
        f = upscale_factor(x.shape[-2:], min_image_side)
        if f > 1:
            x = x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)
        ids = class_ids.detach().cpu()
        if num_classes is None:
            classes = torch.unique(ids).tolist()
        else:
            classes = range(max(num_classes, int(ids.max().item()) + 1 if ids.numel() else 1))
        rows = [x[ids == c][:max_per_class] for c in classes]
        ncol = max(1, max(r.shape[0] for r in rows))
        blank = torch.zeros_like(x[:1])
        tiles = [torch.cat([r, blank.repeat(ncol - r.shape[0], 1, 1, 1)]) for r in rows]
        return make_grid(torch.cat(tiles), nrow=ncol, padding=padding, pad_value=pad_value)


def _check_payload(payload: Any, where: str) -> None:
    """Refuse a payload that is not a synthetic set this library reads (the header,
    :func:`~lightning_distill.artifacts.check_header`)."""
    check_header(payload, _KIND, FORMAT_VERSION, where, legacy_format_key="kind",
                 fix="write synthetic sets with SyntheticSet.save (or import a reference "
                     "script's set)")


def upscale_factor(image_size: Sequence[int], min_image_side: int) -> int:
    """The smallest whole factor that makes the shorter side of ``image_size`` at least
    ``min_image_side`` pixels (1 when it already is)."""
    return max(1, -(-int(min_image_side) // max(1, min(int(v) for v in image_size))))


#: the shorter side, in pixels, that grids of synthetic images give each image by default
#: (PNG files and logger images): an 8x8 digit or a 28x28 Fashion-MNIST item is legible
GRID_MIN_IMAGE_SIDE = 64


@dataclass
class SyntheticSet:
    """A distilled (or baseline) training set: images, labels, learned lr and metadata.

    Args:
        images: [N, C, H, W] floating tensor in the model's input space.
        labels: [N] int64 class ids, or [N, K] floating logits (soft labels).
        lr: evaluation learning rate (the learned syn_lr alpha).
        meta: plain metadata (see the module docstring).
    """

    images: Tensor
    labels: Tensor
    lr: float = 0.01
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else None
            raise InputError(f"SyntheticSet images must be a [N, C, H, W] tensor, got {shape}")
        if not self.images.is_floating_point():
            raise InputError(
                f"SyntheticSet images must be floating point (input space), got {self.images.dtype}"
            )
        if not isinstance(self.labels, Tensor):
            raise InputError(f"SyntheticSet labels must be a tensor, got {type(self.labels)}")
        if self.labels.is_floating_point():
            if self.labels.dim() != 2:
                raise InputError(
                    "SyntheticSet soft labels must be [N, K] logits, got shape "
                    f"{tuple(self.labels.shape)}"
                )
        else:
            if self.labels.dim() != 1:
                raise InputError(
                    "SyntheticSet hard labels must be [N] class ids, got shape "
                    f"{tuple(self.labels.shape)}"
                )
            self.labels = self.labels.long()
        if self.labels.shape[0] != self.images.shape[0]:
            raise InputError(
                f"SyntheticSet has {self.images.shape[0]} images but {self.labels.shape[0]} "
                "labels; give one label per image"
            )
        self.lr = float(self.lr.item() if isinstance(self.lr, Tensor) else self.lr)
        self.meta = dict(self.meta or {})

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def soft(self) -> bool:
        """True for soft labels ([N, K] logits)."""
        return self.labels.is_floating_point()

    @property
    def class_ids(self) -> Tensor:
        """[N] int64 class of each image: the labels, or ``labels.argmax(1)`` when soft."""
        return self.labels.argmax(1) if self.soft else self.labels

    @property
    def num_classes(self) -> int:
        """``meta["num_classes"]``, else K for soft labels, else max class id + 1."""
        if self.meta.get("num_classes") is not None:
            return int(self.meta["num_classes"])
        if self.soft:
            return int(self.labels.shape[1])
        return int(self.labels.max().item()) + 1 if len(self) else 0

    @property
    def ipc(self) -> int:
        """Images per class: ``meta["ipc"]``, else N // num_classes."""
        if self.meta.get("ipc") is not None:
            return int(self.meta["ipc"])
        k = self.num_classes
        return len(self) // k if k else 0

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    @property
    def input_space(self) -> InputSpace | None:
        """``meta["input_space"]`` read as an :class:`InputSpace` (None when absent)."""
        raw = self.meta.get("input_space")
        return None if raw is None else InputSpace.coerce(raw)

    # ------------------------------------------------------------------ helpers
    def to(self, device: torch.device | str) -> SyntheticSet:
        """A copy with images and labels on ``device`` (meta shared by value)."""
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device),
            meta=dict(self.meta),
        )

    def detach_clone(self) -> SyntheticSet:
        """An independent copy (detached tensors; meta copied)."""
        return dataclasses.replace(
            self, images=self.images.detach().clone(), labels=self.labels.detach().clone(),
            meta=_plain(self.meta, ""),
        )

    def check_compatible(
        self,
        *,
        channels: int,
        image_size: int | Sequence[int],
        num_classes: int,
        input_space: InputSpace | Mapping[str, Any] | None = None,
    ) -> None:
        """Raise ``ValueError`` if this set cannot be used with the given data set.

        Checks channels, image size (H, W), number of classes, and the input space with
        :meth:`InputSpace.matches` (data set, normalisation, mean/std, ZCA fingerprint:
        whatever both sides record).
        """
        name = self.meta.get("path") or "synthetic set"
        if self.channels != int(channels):
            raise InputError(
                f"{name}: channels mismatch: the synthetic images have {self.channels} "
                f"channels, the data set has {int(channels)}; evaluate it on the data set "
                "it was distilled from (meta dataset="
                f"{self.meta.get('dataset')!r})"
            )
        hw = _hw(image_size)
        if self.image_size != hw:
            raise InputError(
                f"{name}: image size mismatch: the synthetic images are {self.image_size}, "
                f"the data set's are {hw}; evaluate it on the data set it was distilled from "
                f"(meta dataset={self.meta.get('dataset')!r}) at the same resolution"
            )
        k = self.num_classes
        if k != int(num_classes) or (self.soft and self.labels.shape[1] != int(num_classes)):
            got = self.labels.shape[1] if self.soft else k
            raise InputError(
                f"{name}: classes mismatch: the synthetic set has {got} classes, the data "
                f"set has {int(num_classes)}; evaluate it on the data set it was distilled "
                f"from (meta dataset={self.meta.get('dataset')!r})"
            )
        diff = InputSpace.coerce(self.input_space).mismatch(input_space)
        if diff is not None:
            raise InputError(
                f"{name}: input space mismatch ({diff}): the synthetic images live in "
                f"{self.input_space}, the test data in {InputSpace.coerce(input_space)}; transform "
                "the test data the same way as the distillation data (same normalisation, "
                "or the same fitted ZCA)"
            )

    def check_finite(self, where: str | None = None) -> None:
        """Raise ``ValueError`` if the images or (soft) labels hold NaN or inf: a network
        trained on them learns nothing, and its accuracy would be reported as if it did.
        ``where`` names the set in the message (default ``meta["path"]``)."""
        name = where or self.meta.get("path") or "synthetic set"
        for what, t in (("images", self.images), ("labels", self.labels)):
            if not t.is_floating_point():
                continue  # hard labels are integers, always finite
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                raise InputError(
                    f"{name}: the synthetic {what} hold {bad} NaN or inf value(s) (of "
                    f"{t.numel()}); the distillation that wrote them diverged. Do not "
                    "evaluate this set: use a set saved before the divergence (best.pt, or "
                    "an earlier checkpoint's), or distill again with a smaller lr_img / lr_y "
                    "or a tighter syn_lr_max"
                )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_real(
        cls,
        images: Tensor,
        labels: Tensor,
        ipc: int,
        num_classes: int,
        generator: torch.Generator | None = None,
        lr: float = 0.01,
        meta: Mapping[str, Any] | None = None,
    ) -> SyntheticSet:
        """The "random real" baseline: ``ipc`` distinct random real images per class.

        Images are ordered class by class (class 0 first); within a class the order is
        the random draw (``torch.randperm`` with ``generator``, on the CPU).
        """
        if ipc < 1:
            raise InputError(f"from_real: ipc must be >= 1, got {ipc}")
        labels = labels.long().reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise InputError(
                f"from_real: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        lab_cpu = labels.cpu()
        chosen = []
        for c in range(int(num_classes)):
            idx = torch.nonzero(lab_cpu == c, as_tuple=False).reshape(-1)
            if idx.numel() < ipc:
                raise InputError(
                    f"from_real: class {c} has only {idx.numel()} images, fewer than ipc={ipc}; "
                    "lower ipc or use a larger training split"
                )
            perm = torch.randperm(idx.numel(), generator=generator)
            chosen.append(idx[perm[:ipc]])
        sel = torch.cat(chosen).to(images.device)
        m = {
            "ipc": int(ipc),
            "num_classes": int(num_classes),
            "channels": int(images.shape[1]),
            "image_size": [int(images.shape[2]), int(images.shape[3])],
            "source": "random_real",
        }
        m.update(dict(meta or {}))
        m["ipc"], m["num_classes"] = int(ipc), int(num_classes)
        return cls(images[sel].detach().clone(), labels.to(images.device)[sel].clone(), lr, m)

    @property
    def hard_labels(self) -> Tensor:
        """[N] int64: the labels when hard, else the class each image stands for
        (:func:`~lightning_distill.data.reference_sets.hard_labels`: class-major, as
        DD-Ranking's hard-label runs give them)."""
        return hard_labels(self.labels, self.num_classes)

    @classmethod
    def from_reference(cls, path: str | os.PathLike, datamodule: Any, *,
                       iteration: str | int = "best", lr: float | None = None,
                       check_space: bool = True) -> SyntheticSet:
        """A set saved by the distill script of MTT, DATM or PAD (docs/formats.md,
        'Reference scripts' synthetic sets'), for the data of ``datamodule`` (a
        :class:`~lightning_distill.data.RealDataModule`, set up here if it is not).

        ``path``: the directory of ``images_<tag>.pt`` / ``labels_<tag>.pt`` (or the run's
        directory above DATM's ``Normal``); ``iteration``: ``"best"`` or an iteration
        number; ``lr``: the step size, when the directory holds no ``lr_<tag>.pt`` /
        ``syn_lr_<tag>.pt`` (MTT) or to replace it. The set is checked against the data:
        image shape, classes, labels in range, finite values, and its input space: a
        ``meta_<tag>.json`` written by :meth:`to_reference` names it, else the images'
        statistics must not be clearly another space's (``check_space``;
        :func:`~lightning_distill.data.reference_sets.check_space`). The set's ``meta``
        records the data set, its input space and ``imported_from``."""
        ref = read_reference(path, iteration, lr)
        where = ref.directory / f"images_{ref.tag}.pt"
        if ref.lr is None:
            raise InputError(
                f"{ref.directory}: no lr_{ref.tag}.pt or syn_lr_{ref.tag}.pt (MTT saves no "
                "step size): pass the run's learned syn_lr (lr=..., --lr on the command line)")
        if getattr(datamodule, "train_set", None) is None:
            datamodule.setup("fit")
        check_reference(ref, channels=datamodule.channels, image_size=datamodule.image_size,
                        num_classes=datamodule.num_classes)
        space = datamodule.input_space
        recorded = ref.meta.get("input_space")
        name = f"data.name={datamodule.name}, data.zca={str(datamodule.use_zca).lower()}"
        if recorded:
            diff = InputSpace.coerce(recorded).mismatch(space)
            if diff is not None:
                raise DataFormatError(
                    f"{ref.directory / f'meta_{ref.tag}.json'}: the set was written for the "
                    f"input space {InputSpace.coerce(recorded)}, the data's differ ({diff}); "
                    "import it with the data settings it was distilled with")
        elif check_space:
            declared, candidates = space_candidates(datamodule)
            check_statistics(ref.images, candidates, declared, str(where),
                             f"name the data settings the run used ({name} now: pass "
                             "--data.zca true or false), or --check_space false to import "
                             "it anyway")
        meta = {k: v for k, v in ref.meta.items() if k not in ("created", "path")}
        meta.update({"dataset": datamodule.name, "input_space": space.to_dict(),
                     "num_classes": int(datamodule.num_classes),
                     "imported_from": {"directory": str(ref.directory), "tag": ref.tag,
                                       "files": ref.files, "lr_source": ref.lr_source}})
        return cls(ref.images, ref.labels, float(ref.lr), meta)

    def to_reference(self, directory: str | os.PathLike, *, tag: str = "best",
                     overwrite: bool = False) -> list[Path]:
        """Write this set in DATM's layout into ``directory``: ``images_<tag>.pt``,
        ``labels_<tag>.pt``, ``lr_<tag>.pt`` (what the reference evaluators and
        DD-Ranking read) and ``meta_<tag>.json`` (this set's ``meta``, which they ignore
        and :meth:`from_reference` restores). Returns the paths written."""
        self.check_finite()
        meta = _plain(self.meta, "")
        meta.pop("path", None)
        return write_reference(directory, self.images, self.labels, self.lr, tag=tag,
                               meta=meta, overwrite=overwrite)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The plain payload written by :meth:`save`."""
        meta = _plain(self.meta, "")
        meta.pop("path", None)
        meta.setdefault("num_classes", self.num_classes)
        meta.setdefault("ipc", self.ipc)
        meta.setdefault("channels", self.channels)
        meta.setdefault("image_size", list(self.image_size))
        head = header(_KIND, FORMAT_VERSION, meta.get("input_space"))
        meta.setdefault("created", head["created"])
        return {
            **head,
            "created": meta["created"],
            "kind": _KIND,  # the format's name as files before the header had it
            "images": self.images.detach().cpu().contiguous().clone(),
            "labels": self.labels.detach().cpu().contiguous().clone(),
            "lr": float(self.lr),
            "meta": meta,
        }

    def save(
        self,
        path: str | os.PathLike,
        to_pixels: Callable[[Tensor], Tensor] | None = None,
        grid: bool = True,
    ) -> Path:
        """Write the ``.pt`` file atomically and (``grid``) a PNG grid with the same stem.

        ``to_pixels`` maps input-space images to [0, 1] pixels (de-normalise, inverse
        ZCA); without it each image is min-max scaled on its own. Returns the .pt path.
        """
        target = Path(path)
        if target.suffix == "":
            target = target.with_suffix(".pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(self.to_dict(), target)
        if grid:
            self.save_grid(target.with_suffix(".png"), to_pixels=to_pixels)
        return target

    def grid_tensor(
        self, to_pixels: Callable[[Tensor], Tensor] | None = None, padding: int = 2,
        min_image_side: int = GRID_MIN_IMAGE_SIDE,
    ) -> Tensor:
        """[3, H', W'] image grid in [0, 1]: one row per class, images in set order.

        :func:`class_grid` with a row for every class 0..num_classes - 1 (an empty class is
        a blank row), no cap on the row length, black padding and every image enlarged
        by nearest neighbour to at least ``min_image_side`` pixels a side.
        """
        return class_grid(
            self.images, self.class_ids, to_pixels, max_per_class=None,
            num_classes=self.num_classes, padding=padding, pad_value=0.0,
            min_image_side=min_image_side,
        )

    def save_grid(
        self, path: str | os.PathLike, to_pixels: Callable[[Tensor], Tensor] | None = None,
        min_image_side: int = GRID_MIN_IMAGE_SIDE,
    ) -> Path:
        """Write :meth:`grid_tensor` as a PNG, atomically."""
        from torchvision.utils import save_image

        target = Path(path)
        g = self.grid_tensor(to_pixels, min_image_side=min_image_side)
        with atomic_open(target, "wb") as f:
            save_image(g, f, format="png")
        return target

    @classmethod
    def from_dict(cls, payload: Any, where: str = "synthetic set payload") -> SyntheticSet:
        """The inverse of :meth:`to_dict`, validated; errors start with ``where`` (the file
        name when called by :meth:`load`)."""
        _check_payload(payload, where)
        missing = [k for k in _REQUIRED if k not in payload]
        if missing:
            raise InputError(
                f"{where}: synthetic set file is missing key(s) {missing}; re-create it with "
                "SyntheticSet.save"
            )
        images, labels = payload["images"], payload["labels"]
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise InputError(f"{where}: 'images' and 'labels' must be tensors")
        if labels.shape[:1] != images.shape[:1]:
            raise InputError(
                f"{where}: label count mismatch: "
                f"{images.shape[0] if images.dim() else '?'} images but "
                f"{labels.shape[0] if labels.dim() else '?'} labels; the file is damaged, "
                "re-create it"
            )
        lr = payload["lr"]
        if isinstance(lr, Tensor):
            lr = float(lr.item())
        if not isinstance(lr, (int, float)) or not math.isfinite(float(lr)):
            raise InputError(f"{where}: lr must be a finite number, got {lr!r}")
        meta = dict(payload.get("meta") or {})
        try:
            out = cls(images, labels, float(lr), meta)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from e
        return out

    @classmethod
    def from_arg(cls, value: Any, where: str) -> tuple[SyntheticSet, str | None]:
        """A set given either as a SyntheticSet or as the path of its file (loaded):
        ``(set, path or None)``; anything else is refused naming ``where``."""
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value), os.fspath(value)
        if not isinstance(value, cls):
            raise InputTypeError(f"{where}: synthetic must be a SyntheticSet or a file path, got "
                                 f"{type(value).__name__}")
        return value, None

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> SyntheticSet:
        """Read a file written by :meth:`save` (``weights_only=True``), with clear errors;
        a file whose images or labels hold NaN or inf is refused (:meth:`check_finite`)."""
        p = Path(path)
        if not p.exists():
            raise MissingFileError(
                f"synthetic set file {p} does not exist; run distillation first or pass the "
                "path of a .pt file written by SyntheticSet.save"
            )
        if p.is_dir():
            raise InputError(
                f"synthetic set path {p} is a directory; pass the .pt file inside it"
            )
        try:
            payload = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any read failure becomes one clear error
            raise InputError(
                f"cannot read synthetic set file {p}: {type(e).__name__}: {str(e)[:300]}. "
                "The file is corrupt, truncated or not a torch file; re-create it "
                "(distill again) or point to the right file"
            ) from e
        out = cls.from_dict(payload, where=str(p))
        out.check_finite(str(p))
        out.meta["path"] = str(p)
        return out

    def __repr__(self) -> str:
        kind = f"soft[{self.labels.shape[1]}]" if self.soft else "hard"
        return (
            f"SyntheticSet(n={len(self)}, images={tuple(self.images.shape)}, labels={kind}, "
            f"lr={self.lr:.6g}, dataset={self.meta.get('dataset')!r}, ipc={self.ipc})"
        )


def check_eval_data(
    synthetic: SyntheticSet,
    images: Tensor,
    labels: Tensor,
    where: str,
    what: str,
    input_space: Mapping[str, Any] | None = None,
    hint: str = "",
    *,
    num_classes: int | None = None,
) -> None:
    """Raise ``ValueError`` unless ``images``/``labels`` can test a network trained on
    ``synthetic``: same channels, image size (and input space, when given) and no label
    beyond the set's classes. ``num_classes`` (the data set's class count) must also equal
    the set's when given. ``where``/``what`` name the caller and the data in messages."""
    synthetic.check_compatible(
        channels=images.shape[1], image_size=tuple(images.shape[2:]),
        num_classes=synthetic.num_classes if num_classes is None else int(num_classes),
        input_space=input_space,
    )
    if labels.numel() and int(labels.max()) >= synthetic.num_classes:
        raise InputError(
            f"{where}: {what} labels reach class {int(labels.max())} but the synthetic set "
            f"has {synthetic.num_classes} classes{hint}"
        )
