"""Readers of the on-disk formats the real data sets ship in.

- idx (MNIST, Fashion-MNIST): :func:`read_idx`, :func:`find_idx_files`;
- CIFAR python pickles: :func:`read_pickle` (plain containers and numpy arrays only, no
  code), :func:`read_cifar_batch`, :func:`read_label_names`;
- SVHN MATLAB files: :func:`read_svhn_mat`;
- image files (TinyImageNet, image folders): :func:`load_images`, :func:`image_files`,
  :func:`class_dirs`.

Every reader raises :class:`~.container.DatasetFormatError` naming the file when it is
truncated, corrupt or not in the expected format.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InputError
from .container import DatasetFormatError

__all__ = [
    "IDX_FILES",
    "IMAGE_EXTENSIONS",
    "class_dirs",
    "find_idx_files",
    "image_files",
    "load_images",
    "pickle_field",
    "read_cifar_batch",
    "read_idx",
    "read_image",
    "read_label_names",
    "read_pickle",
    "read_svhn_mat",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------ idx format

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped (detected by content) or not.

    Layout: bytes 0-1 zero, byte 2 the element type (0x08 = uint8 ...), byte 3 the
    number of dimensions d, then d big-endian uint32 sizes, then the data. The magic
    number and the data length are checked; a bad file raises DatasetFormatError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetFormatError(
            f"{path}: corrupt or truncated gzip file ({e}); download it again"
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type> <ndim>)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: truncated or corrupt idx file: header says shape {shape} "
            f"({expected} data bytes) but the file holds {len(raw) - header}; download it again"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(dirs: Sequence[Path]) -> tuple[Path, dict[str, Path]] | None:
    for d in dirs:
        found = {}
        for key, stem in IDX_FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(IDX_FILES):
            return d, found
    return None


# ----------------------------------------------------------------- CIFAR pickles

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays (no code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DatasetFormatError(f"{path}: not a readable python pickle batch ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def pickle_field(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetFormatError(f"{path}: missing field {key!r} (has {sorted(map(str, d))})")


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle(path)
    data = np.asarray(pickle_field(d, "data", path))
    labels = np.asarray(pickle_field(d, label_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{path}: expected data [N, 3072] and {label_key} [N], got {data.shape} and "
            f"{labels.shape}"
        )
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def read_label_names(path: Path, key: str) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    names = pickle_field(read_pickle(path), key, path)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# ------------------------------------------------------------------- SVHN .mat

def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for bad files
        raise DatasetFormatError(f"{path}: not a readable MATLAB file ({e})") from e
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables X and y")
    x, y = mat["X"], np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
        raise DatasetFormatError(f"{path}: expected X [H, W, 3, N] and y [N, 1], got {x.shape}")
    y[y == 10] = 0  # SVHN labels digit 0 as 10
    return np.transpose(x, (3, 2, 0, 1)).astype(np.uint8), y


# ----------------------------------------------------------------- image files

def _as_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def read_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read image ({e})") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_images(
    paths: Sequence[Path],
    channels: int = 3,
    image_size: int | Sequence[int] | None = None,
    workers: int | None = None,
) -> Tensor:
    """Read image files with PIL into uint8 ``[N, C, H, W]``.

    ``channels`` 3 converts to RGB, 1 to grayscale; ``image_size`` resizes (bilinear);
    without it every image must have the first image's size.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    size = _as_hw(image_size)
    if not paths:
        h, w = size or (0, 0)
        return torch.zeros(0, channels, h, w, dtype=torch.uint8)
    first = read_image(Path(paths[0]), channels, size)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(i: int) -> None:
        a = read_image(Path(paths[i]), channels, size)
        if a.shape != first.shape:
            raise DatasetFormatError(
                f"{paths[i]}: image shape {a.shape[1:]} differs from {first.shape[1:]} of "
                f"{paths[0]}; pass image_size= to resize"
            )
        out[i] = a

    n_workers = workers or min(8, os.cpu_count() or 1)
    if n_workers <= 1 or len(paths) < 64:
        for i in range(1, len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(n_workers) as ex:
            list(ex.map(work, range(1, len(paths))))
    return torch.from_numpy(out)


def image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_dirs(d: Path) -> dict[str, list[Path]]:
    return {c.name: image_files(c) for c in sorted(d.iterdir()) if c.is_dir()}
