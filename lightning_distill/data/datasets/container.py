"""The container of a real data set: :class:`RealDataset`, and the stratified split.

A :class:`RealDataset` holds the whole train and test splits in memory as uint8
``[N, C, H, W]`` codes, the normalisation constants, the class names and per-class
access; the loaders (:mod:`.loaders`) build one from the on-disk formats (:mod:`.formats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ...errors import DataFormatError, InputError

__all__ = ["DatasetFormatError", "RealDataset", "draw_indices", "mean_std", "stratified_split"]


class DatasetFormatError(DataFormatError):
    """A data file exists but is truncated, corrupt, or not in the expected format."""



def stratified_split(
    labels: Tensor, fraction: float, seed: int, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Split indices ``0..N-1`` into ``(keep, held_out)``, stratified per class.

    For each class c with n_c members, ``round(fraction * n_c)`` members (capped at
    n_c - 1, so each class keeps at least one) chosen by ``torch.randperm`` under
    ``torch.Generator().manual_seed(seed)`` (classes visited in order) are held out.
    Both index tensors are sorted int64; they are disjoint and cover ``0..N-1``.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"split fraction must be in [0, 1), got {fraction}")
    labels = torch.as_tensor(labels).long()
    k = int(labels.max().item()) + 1 if num_classes is None and labels.numel() else num_classes
    g = torch.Generator().manual_seed(int(seed))
    held: list[Tensor] = []
    for c in range(k or 0):
        idx = torch.nonzero(labels == c).flatten()
        n_c = idx.numel()
        n_out = min(int(round(fraction * n_c)), max(n_c - 1, 0))
        perm = torch.randperm(n_c, generator=g)
        held.append(idx[perm[:n_out]])
    held_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).flatten(), held_idx


def draw_indices(
    index: Tensor, n: int | None, generator: torch.Generator | None, asked: str
) -> Tensor:
    """``n`` distinct entries of ``index``, ``index[randperm(len, generator)[:n]]`` (all of
    them, in order, for ``n=None``); too few raise ``ValueError("<asked> has only <len>")``."""
    if n is None:
        return index
    if n > index.numel():
        raise InputError(f"{asked} has only {index.numel()}")
    return index[torch.randperm(index.numel(), generator=generator)[:n]]


@dataclass(eq=False)
class RealDataset:
    """A real data set held in memory.

    Pixels are stored as integer codes (``train_data`` / ``test_data``: uint8
    ``[N, C, H, W]``) and exposed in [0, 1] as ``code / pixel_scale`` (255 for 8-bit
    images, 16 for scikit-learn digits). ``train_images`` / ``test_images`` are the
    float32 [0, 1] tensors, converted once on first access and cached (TinyImageNet's
    train split is 4.9 GB as float32: use :meth:`images` with an index to convert only
    a subset). Labels are int64 ``[N]`` in ``0..num_classes-1``.
    """

    name: str
    train_data: Tensor
    train_labels: Tensor
    test_data: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    pixel_scale: float = 255.0
    source: str = ""
    #: per split, ``(rows sorted by class, offsets)``: class c's rows are
    #: ``rows[offsets[c]:offsets[c + 1]]`` (a prepared data set's class index); ``None``:
    #: found by comparing the labels
    class_index: dict[str, tuple[Tensor, list[int]]] | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.class_names = tuple(str(c) for c in self.class_names)
        for split in ("train", "test"):
            data, labels = getattr(self, f"{split}_data"), getattr(self, f"{split}_labels")
            if data.dtype != torch.uint8 or data.dim() != 4:
                raise InputError(
                    f"{self.name}: {split}_data must be uint8 [N, C, H, W], got "
                    f"{data.dtype} {tuple(data.shape)}"
                )
            labels = labels.long()
            setattr(self, f"{split}_labels", labels)
            if labels.shape != (data.shape[0],):
                raise InputError(
                    f"{self.name}: {split} has {data.shape[0]} images but labels of shape "
                    f"{tuple(labels.shape)}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise InputError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), got "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
        if self.train_data.shape[1:] != self.test_data.shape[1:] and self.test_data.shape[0]:
            raise InputError(
                f"{self.name}: train images {tuple(self.train_data.shape[1:])} and test images "
                f"{tuple(self.test_data.shape[1:])} differ in shape"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise InputError(
                f"{self.name}: mean/std need one value per channel ({self.channels}), got "
                f"{self.mean} / {self.std}"
            )

    # -- shape facts -------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.train_data.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_data.shape[2]), int(self.train_data.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.train_data.shape[0])

    def __repr__(self) -> str:
        return (
            f"RealDataset(name={self.name!r}, train={len(self)}, test={self.test_data.shape[0]}, "
            f"channels={self.channels}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )

    # -- pixels ------------------------------------------------------------------------
    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, f"{split}_data"), getattr(self, f"{split}_labels")

    def images(self, split: str = "train", index: Tensor | Sequence[int] | None = None) -> Tensor:
        """float32 images in [0, 1] (``code / pixel_scale``) of ``split``, optionally indexed."""
        data, _ = self._split(split)
        if index is not None:
            data = data[torch.as_tensor(index, dtype=torch.long)]
        return data.to(torch.float32).div_(self.pixel_scale)

    @cached_property
    def train_images(self) -> Tensor:
        """float32 ``[N, C, H, W]`` training images in [0, 1] (cached)."""
        return self.images("train")

    @cached_property
    def test_images(self) -> Tensor:
        """float32 ``[N, C, H, W]`` test images in [0, 1] (cached)."""
        return self.images("test")

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel, for x in [0, 1] shaped ``[..., C, H, W]``."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean``."""
        mean, std = self._stats(x)
        return x * std + mean

    # -- classes -----------------------------------------------------------------------
    def _check_class(self, c: int) -> int:
        c = int(c)
        if not 0 <= c < self.num_classes:
            raise InputError(f"{self.name}: class {c} out of range [0, {self.num_classes})")
        return c

    def indices_of_class(self, c: int, split: str = "train") -> Tensor:
        """Sorted int64 indices of the ``split`` images whose label is ``c``."""
        _, labels = self._split(split)
        c = self._check_class(c)
        if self.class_index is not None and split in self.class_index:
            rows, offsets = self.class_index[split]
            return rows[offsets[c]:offsets[c + 1]].sort().values
        return torch.nonzero(labels == c).flatten()

    def images_of_class(
        self,
        c: int,
        n: int | None = None,
        generator: torch.Generator | None = None,
        split: str = "train",
    ) -> Tensor:
        """``n`` distinct random real images of class ``c`` (float32 in [0, 1]).

        ``n=None`` returns all of them in index order. The draw is
        ``torch.randperm(count, generator=generator)[:n]``.
        """
        idx = draw_indices(self.indices_of_class(c, split), n, generator,
                           f"{self.name}: asked for {n} images of class {c} but the {split} split")
        return self.images(split, idx)

    def split_validation(self, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Seeded held-out validation split of the training set: ``(train_idx, val_idx)``.

        Stratified per class (see :func:`stratified_split`); deterministic for a seed;
        the two sorted index sets are disjoint and cover the training set.
        """
        return stratified_split(self.train_labels, fraction, seed, self.num_classes)


def mean_std(data: Tensor, scale: float = 255.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images / scale, in float64."""
    x = data.transpose(0, 1).reshape(data.shape[1], -1).double() / scale
    return tuple(x.mean(1).tolist()), tuple(x.std(1, unbiased=False).tolist())
