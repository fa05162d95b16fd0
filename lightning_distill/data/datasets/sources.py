"""Data sets read a range of rows at a time: :class:`DatasetSource`, for preparation.

A registered loader (:mod:`.registry`) returns a whole :class:`~.container.RealDataset`
in memory. A data set too large for that (ImageNet-1K at 64 px is 15.7 GB as uint8)
also registers a *source* (:func:`register_source`): the same facts (classes,
normalisation, shape) with each split as a :class:`SplitSource`, whose
``read(start, stop)`` returns rows ``start..stop-1`` only. The one-time preparation
(:mod:`lightning_distill.data.prepared`) walks a source in chunks and writes each split
as a memory-mapped uint8 array, so that no stage ever holds a split.

Every registered data set has a source: :func:`get_source` falls back to wrapping the
loader's in-memory :class:`RealDataset` (:func:`source_from_dataset`), which is what the
small sets (digits, Fashion-MNIST, CIFAR) need.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InputError
from .container import RealDataset, mean_std
from .registry import _key, default_data_root, get_dataset, register_in

__all__ = ["DatasetSource", "SplitSource", "dataset_from_source", "get_source", "register_source",
           "source_from_dataset"]

#: ``read(start, stop) -> (codes uint8 [stop - start, C, H, W], labels int64 [stop - start])``
RowReader = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class SplitSource:
    """One split, read by row ranges.

    Args:
        count: number of rows (images).
        image_shape: ``(C, H, W)`` of every image.
        read: ``read(start, stop)`` for ``0 <= start < stop <= count``: uint8 codes
            ``[stop - start, C, H, W]`` and int64 labels in ``0..num_classes-1``; it raises
            :class:`~.container.DatasetFormatError` naming the file at fault.
        files: the files the split is read from (recorded in the prepared header).
        labels: all ``count`` labels (int64), when known without reading the images
            (they let the preparation write the class index up front); ``None`` if not.
    """

    count: int
    image_shape: tuple[int, int, int]
    read: RowReader
    files: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None


@dataclass
class DatasetSource:
    """A data set as the preparation reads it: facts, and one :class:`SplitSource` per split.

    ``settings`` holds what, beyond the files, decides the prepared pixels (the resize
    size and filter, a class subset, ...): a prepared split written for other settings is
    refused rather than used. ``mean`` / ``std`` may be ``None`` where the data set has no
    published constants: the preparation then measures them on the training split.
    """

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    train: SplitSource
    test: SplitSource
    pixel_scale: float = 255.0
    source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitSource:
        if name not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test


def _tensor_split(data: Any, labels: Any) -> SplitSource:
    codes, labs = data.numpy(), labels.numpy().astype(np.int64)

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return codes[start:stop], labs[start:stop]

    return SplitSource(int(codes.shape[0]), tuple(int(s) for s in codes.shape[1:]), read,
                       labels=labs)


def source_from_dataset(real: RealDataset, settings: dict[str, Any] | None = None) -> DatasetSource:
    """An in-memory :class:`RealDataset` as a source (rows are slices of its tensors)."""
    return DatasetSource(
        name=real.name,
        class_names=real.class_names,
        mean=real.mean,
        std=real.std,
        train=_tensor_split(real.train_data, real.train_labels),
        test=_tensor_split(real.test_data, real.test_labels),
        pixel_scale=real.pixel_scale,
        source=real.source,
        settings=dict(settings or {}),
    )


def dataset_from_source(src: DatasetSource, chunk: int = 4096) -> RealDataset:
    """A :class:`RealDataset` holding every row of ``src`` (each split read in chunks of
    ``chunk`` rows): the in-memory loader of a data set registered as a source. Without
    the source's ``mean`` / ``std``: those of the training images (:func:`mean_std`)."""

    def whole(split: SplitSource) -> tuple[torch.Tensor, torch.Tensor]:
        codes = np.empty((split.count, *split.image_shape), dtype=np.uint8)
        labels = np.empty(split.count, dtype=np.int64)
        for start in range(0, split.count, chunk):
            stop = min(start + chunk, split.count)
            codes[start:stop], labels[start:stop] = split.read(start, stop)
        return torch.from_numpy(codes), torch.from_numpy(labels)

    (x_train, y_train), (x_test, y_test) = whole(src.train), whole(src.test)
    mean, std = src.mean, src.std
    if mean is None or std is None:
        mean, std = mean_std(x_train, src.pixel_scale)
    return RealDataset(src.name, x_train, y_train, x_test, y_test, mean, std,
                       src.class_names, pixel_scale=src.pixel_scale, source=src.source)


SourceFactory = Callable[..., DatasetSource]
_SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory | None = None) -> Any:
    """Register ``factory(root: Path, **kw) -> DatasetSource`` under the name of a
    registered data set (decorator or call). Its keywords are the loader's."""

    return register_in(_SOURCES, "source", name, factory)


def get_source(name: str, root: str | os.PathLike | None = None, **kw: Any) -> DatasetSource:
    """The registered source of data set ``name``; for a data set registered only as a
    loader, its in-memory :class:`RealDataset` wrapped by :func:`source_from_dataset`
    (``settings`` = the loader's keywords)."""
    matches = [k for k in _SOURCES if _key(k) == _key(name)]
    if matches:
        path = Path(root).expanduser() if root is not None else default_data_root()
        return _SOURCES[matches[0]](path, **kw)
    return source_from_dataset(get_dataset(name, root, **kw), settings=kw)
