"""Registry of real data sets, read from their original on-disk formats.

``get_dataset(name, root=None, **kw)`` returns a :class:`RealDataset` holding the whole
train and test splits in memory as uint8 ``[N, C, H, W]`` tensors, plus the
normalisation constants of REFERENCE section 2, the class names, and per-class access.

Registered names (``list_datasets()``):

=============  ======================================================================
digits         scikit-learn ``load_digits`` (bundled): 1797 images 1x8x8, 10 classes.
               No official test split: a fixed stratified split (1/3 test, seed 0).
fashion_mnist  idx files (gzipped or not) in ``root``, ``root/FashionMNIST/raw`` or the
               Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
mnist          idx files in ``root`` or ``root/MNIST/raw`` (torchvision layout).
cifar10        ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.
cifar100       ``root/cifar-100-python/{train, test, meta}`` (fine labels; ``coarse=True``).
svhn           ``root/{train,test}_32x32.mat`` (label 10 means digit 0 and maps to 0).
tiny_imagenet  ``root/tiny-imagenet-200`` exactly as the official zip unpacks; the
               labelled ``val/`` split is used as the test split.
image_folder   ``root/train/<class>/*`` and ``root/test/<class>/*``, or ``root/<class>/*``
               with a seeded stratified test split.
=============  ======================================================================

``root`` defaults to ``$LIGHTNING_DISTILL_DATA`` if set, else
``~/.cache/lightning_distill/data`` (:func:`default_data_root`). A missing data set
raises :class:`FileNotFoundError` listing every path looked at and how to get the data;
a corrupt or truncated file raises :class:`DatasetFormatError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DatasetFormatError",
    "RealDataset",
    "default_data_root",
    "get_dataset",
    "list_datasets",
    "read_idx",
    "register_dataset",
    "stratified_split",
]

DATA_ENV_VAR = "LIGHTNING_DISTILL_DATA"

# Normalisation constants (REFERENCE section 2).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2861,), (0.3530,)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

#: Where the Debian package ``dataset-fashion-mnist`` installs the original idx files.
FASHION_MNIST_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetFormatError(ValueError):
    """A data file exists but is truncated, corrupt, or not in the expected format."""


# --------------------------------------------------------------------------- dataset


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
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
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

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.class_names = tuple(str(c) for c in self.class_names)
        for split in ("train", "test"):
            data, labels = getattr(self, f"{split}_data"), getattr(self, f"{split}_labels")
            if data.dtype != torch.uint8 or data.dim() != 4:
                raise ValueError(
                    f"{self.name}: {split}_data must be uint8 [N, C, H, W], got "
                    f"{data.dtype} {tuple(data.shape)}"
                )
            labels = labels.long()
            setattr(self, f"{split}_labels", labels)
            if labels.shape != (data.shape[0],):
                raise ValueError(
                    f"{self.name}: {split} has {data.shape[0]} images but labels of shape "
                    f"{tuple(labels.shape)}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), got "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
        if self.train_data.shape[1:] != self.test_data.shape[1:] and self.test_data.shape[0]:
            raise ValueError(
                f"{self.name}: train images {tuple(self.train_data.shape[1:])} and test images "
                f"{tuple(self.test_data.shape[1:])} differ in shape"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
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
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
            raise ValueError(f"{self.name}: class {c} out of range [0, {self.num_classes})")
        return c

    def indices_of_class(self, c: int, split: str = "train") -> Tensor:
        """Sorted int64 indices of the ``split`` images whose label is ``c``."""
        _, labels = self._split(split)
        return torch.nonzero(labels == self._check_class(c)).flatten()

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
        idx = self.indices_of_class(c, split)
        if n is not None:
            if n > idx.numel():
                raise ValueError(
                    f"{self.name}: asked for {n} images of class {c} but the {split} split "
                    f"has only {idx.numel()}"
                )
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return self.images(split, idx)

    def split_validation(self, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Seeded held-out validation split of the training set: ``(train_idx, val_idx)``.

        Stratified per class (see :func:`stratified_split`); deterministic for a seed;
        the two sorted index sets are disjoint and cover the training set.
        """
        return stratified_split(self.train_labels, fraction, seed, self.num_classes)


# -------------------------------------------------------------------------- registry

Loader = Callable[..., RealDataset]
_REGISTRY: dict[str, Loader] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_dataset(name: str, loader: Loader | None = None) -> Any:
    """Register ``loader(root: Path, **kw) -> RealDataset`` under ``name``.

    Usable as a decorator (``@register_dataset("mine")``) or a call. Names match
    case-insensitively, ignoring ``-`` and ``_`` (``"CIFAR-10"`` finds ``cifar10``).
    """

    def deco(fn: Loader) -> Loader:
        if _key(name) in {_key(k) for k in _REGISTRY}:
            raise ValueError(f"a data set named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco(loader) if loader is not None else deco


def list_datasets() -> list[str]:
    """Registered data set names, sorted."""
    return sorted(_REGISTRY)


def default_data_root() -> Path:
    """``$LIGHTNING_DISTILL_DATA`` if set, else ``~/.cache/lightning_distill/data``."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_distill" / "data"


def get_dataset(name: str, root: str | os.PathLike | None = None, **kw: Any) -> RealDataset:
    """Load the registered data set ``name`` from ``root`` (default :func:`default_data_root`).

    Extra keywords go to the loader (e.g. ``download=True`` for the torchvision sets,
    ``image_size`` / ``channels`` for ``image_folder``).
    """
    matches = [k for k in _REGISTRY if _key(k) == _key(name)]
    if not matches:
        raise ValueError(f"unknown data set {name!r}; registered: {', '.join(list_datasets())}")
    path = Path(root).expanduser() if root is not None else default_data_root()
    return _REGISTRY[matches[0]](path, **kw)


def _missing(name: str, looked: Sequence[str], how: Sequence[str]) -> FileNotFoundError:
    lines = [f"data set {name!r} not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines += ["How to get it:"] + [f"  - {h}" for h in how]
    lines += ["In a recipe or on the lightning-distill command line: point data.root at the "
              "folder, or set data.kwargs: {download: true} where the loader can download "
              "(--data.root DIR, --data.kwargs '{download: true}')."]
    return FileNotFoundError("\n".join(lines))


def _first_dir(
    name: str, dirs: Sequence[Path], ok: Callable[[Path], bool], needs: str, how: str
) -> Path:
    """The first of ``dirs`` for which ``ok(dir)`` holds, else a :func:`_missing` error
    listing every candidate with what it ``needs`` and ``how`` to get the data."""
    d = next((d for d in dirs if ok(d)), None)
    if d is None:
        raise _missing(name, [f"{d}  (needs {needs})" for d in dirs], [how])
    return d


def _from_arrays(
    name: str,
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    test: Sequence[tuple[np.ndarray, np.ndarray]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: tuple[str, ...],
    source: Path,
) -> RealDataset:
    """A :class:`RealDataset` from uint8 [N, C, H, W] / int64 [N] numpy parts per split
    (several parts are concatenated in order)."""

    def join(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
        if len(parts) == 1:
            x, y = parts[0]
        else:
            x, y = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
        return _uint8(x), torch.from_numpy(y)

    (x_train, y_train), (x_test, y_test) = join(train), join(test)
    return RealDataset(
        name=name,
        train_data=x_train,
        train_labels=y_train,
        test_data=x_test,
        test_labels=y_test,
        mean=mean,
        std=std,
        class_names=class_names,
        source=str(source),
    )


def _uint8(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


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


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_dir(dirs: Sequence[Path]) -> tuple[Path, dict[str, Path]] | None:
    for d in dirs:
        found = {}
        for key, stem in _IDX_FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(_IDX_FILES):
            return d, found
    return None


def _load_idx_dataset(
    name: str,
    dirs: Sequence[Path],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes: tuple[str, ...],
    how: Sequence[str],
) -> RealDataset:
    hit = _find_idx_dir(dirs)
    if hit is None:
        files = ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values())
        raise _missing(name, [f"{d}  (needs {files})" for d in dirs], how)
    d, files = hit
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise DatasetFormatError(
                f"{files[f'{split}_images']} / {files[f'{split}_labels']}: expected images "
                f"[N, H, W] and labels [N], got {img.shape} and {lab.shape}"
            )
    return RealDataset(
        name=name,
        train_data=_uint8(arrays["train_images"][:, None]),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_data=_uint8(arrays["test_images"][:, None]),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        mean=mean,
        std=std,
        class_names=classes,
        source=str(d),
    )


def _torchvision_download(cls_name: str, root: Path, splits: Sequence[dict[str, Any]]) -> None:
    """Let ``torchvision.datasets.<cls_name>`` download (and unpack) into ``root``; its
    layout is the one the loaders here search."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    for split_kw in splits:
        getattr(tvd, cls_name)(str(root), download=True, **split_kw)


@register_dataset("mnist")
def load_mnist(root: Path, download: bool = False) -> RealDataset:
    """MNIST from idx files in ``root``, ``root/MNIST/raw`` or ``root/mnist``."""
    if download:
        _torchvision_download("MNIST", root, splits=[{"train": True}, {"train": False}])
    dirs = [root, root / "MNIST" / "raw", root / "mnist"]
    how = [
        f"get_dataset('mnist', root=..., download=True) (torchvision writes {root}/MNIST/raw)",
        "or put train-images-idx3-ubyte.gz etc. from the MNIST site directly in root",
    ]
    return _load_idx_dataset("mnist", dirs, MNIST_MEAN, MNIST_STD, DIGIT_CLASSES, how)


@register_dataset("fashion_mnist")
def load_fashion_mnist(root: Path, download: bool = False) -> RealDataset:
    """Fashion-MNIST idx files; search ``root``, ``root/FashionMNIST/raw``,
    ``root/fashion-mnist``, then the Debian package dir (REFERENCE section 2)."""
    if download:
        _torchvision_download("FashionMNIST", root, splits=[{"train": True}, {"train": False}])
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    dirs += [Path(p) for p in FASHION_MNIST_SYSTEM_DIRS]
    how = [
        "Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs the idx files in "
        f"{FASHION_MNIST_SYSTEM_DIRS[0]})",
        "or pass root= a directory holding train-images-idx3-ubyte.gz etc.",
        "or get_dataset('fashion_mnist', root=..., download=True) (torchvision)",
    ]
    return _load_idx_dataset(
        "fashion_mnist", dirs, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES, how
    )


# --------------------------------------------------------------------------- digits


DIGITS_TEST_FRACTION = 1.0 / 3.0
DIGITS_SPLIT_SEED = 0


@register_dataset("digits")
def load_digits(root: Path | None = None) -> RealDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16 -> /16).

    There is no official test split: a fixed stratified split holds out 1/3 of each
    class (:func:`stratified_split` with seed 0), leaving 1198 train / 599 test, so
    published numbers stay comparable. mean/std are those of the training split.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    codes = np.asarray(bunch.images).round().astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, 10)
    data = torch.from_numpy(codes)
    mean, std = _mean_std(data[train_idx], 16.0)
    return RealDataset(
        name="digits",
        train_data=data[train_idx],
        train_labels=labels[train_idx],
        test_data=data[test_idx],
        test_labels=labels[test_idx],
        mean=mean,
        std=std,
        class_names=DIGIT_CLASSES,
        pixel_scale=16.0,
        source="sklearn.datasets.load_digits",
    )


# ---------------------------------------------------------------------------- CIFAR


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


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DatasetFormatError(f"{path}: not a readable python pickle batch ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _field(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetFormatError(f"{path}: missing field {key!r} (has {sorted(map(str, d))})")


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    data = np.asarray(_field(d, "data", path))
    labels = np.asarray(_field(d, label_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{path}: expected data [N, 3072] and {label_key} [N], got {data.shape} and "
            f"{labels.shape}"
        )
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def _names(path: Path, key: str) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    names = _field(_read_pickle(path), key, path)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


@register_dataset("cifar10")
def load_cifar10(root: Path, download: bool = False) -> RealDataset:
    """CIFAR-10 python batches: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``
    (``b'data'`` uint8 [N, 3072] in CHW order, ``b'labels'``), names in ``batches.meta``."""
    if download:
        _torchvision_download("CIFAR10", root, splits=[{"train": True}])
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    d = _first_dir(
        "cifar10",
        [root / "cifar-10-batches-py", root],
        lambda d: all((d / f).is_file() for f in files),
        ", ".join(files),
        f"get_dataset('cifar10', root=..., download=True) (torchvision), or "
        f"download and untar {CIFAR10_URL} into root",
    )
    train = [_cifar_batch(d / f, "labels") for f in files[:5]]
    test = _cifar_batch(d / "test_batch", "labels")
    names = _names(d / "batches.meta", "label_names") or CIFAR10_CLASSES
    return _from_arrays("cifar10", train, [test], CIFAR_MEAN, CIFAR_STD, names, d)


@register_dataset("cifar100")
def load_cifar100(root: Path, download: bool = False, coarse: bool = False) -> RealDataset:
    """CIFAR-100 python files ``cifar-100-python/{train, test, meta}``: ``b'data'`` and
    ``b'fine_labels'`` (100 classes; ``coarse=True``: ``b'coarse_labels'``, 20)."""
    if download:
        _torchvision_download("CIFAR100", root, splits=[{"train": True}])
    d = _first_dir(
        "cifar100",
        [root / "cifar-100-python", root],
        lambda d: (d / "train").is_file() and (d / "test").is_file(),
        "train, test, meta",
        f"get_dataset('cifar100', root=..., download=True) (torchvision), or "
        f"download and untar {CIFAR100_URL} into root",
    )
    kind = "coarse" if coarse else "fine"
    train = _cifar_batch(d / "train", f"{kind}_labels")
    test = _cifar_batch(d / "test", f"{kind}_labels")
    k = 20 if coarse else 100
    names = _names(d / "meta", f"{kind}_label_names") or tuple(str(i) for i in range(k))
    return _from_arrays("cifar100", [train], [test], CIFAR_MEAN, CIFAR_STD, names, d)


# ----------------------------------------------------------------------------- SVHN


def _svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


@register_dataset("svhn")
def load_svhn(root: Path, download: bool = False, extra: bool = False) -> RealDataset:
    """SVHN cropped digits: ``{train,test}_32x32.mat`` (X [32, 32, 3, N], y [N, 1] with
    10 for digit 0, mapped to 0); ``extra=True`` appends ``extra_32x32.mat`` to train."""
    if download:
        splits = [{"split": "train"}, {"split": "test"}] + ([{"split": "extra"}] if extra else [])
        _torchvision_download("SVHN", root, splits=splits)
    files = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    d = _first_dir(
        "svhn",
        [root, root / "svhn", root / "SVHN"],
        lambda d: all((d / f).is_file() for f in files),
        ", ".join(files),
        "get_dataset('svhn', root=..., download=True) (torchvision), or download "
        f"the .mat files of 'Format 2' from {SVHN_URL} into root",
    )
    parts = [_svhn_mat(d / f) for f in files]
    train = [parts[0]] + parts[2:]
    return _from_arrays("svhn", train, [parts[1]], SVHN_MEAN, SVHN_STD, DIGIT_CLASSES, d)


# --------------------------------------------------------------------------- images


def _as_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _read_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
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
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = _as_hw(image_size)
    if not paths:
        h, w = size or (0, 0)
        return torch.zeros(0, channels, h, w, dtype=torch.uint8)
    first = _read_image(Path(paths[0]), channels, size)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(i: int) -> None:
        a = _read_image(Path(paths[i]), channels, size)
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


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(d: Path) -> dict[str, list[Path]]:
    return {c.name: _image_files(c) for c in sorted(d.iterdir()) if c.is_dir()}


def _mean_std(data: Tensor, scale: float = 255.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images / scale, in float64."""
    x = data.transpose(0, 1).reshape(data.shape[1], -1).double() / scale
    return tuple(x.mean(1).tolist()), tuple(x.std(1, unbiased=False).tolist())


@register_dataset("tiny_imagenet")
def load_tiny_imagenet(
    root: Path,
    download: bool = False,
    image_size: int | Sequence[int] | None = None,
    workers: int | None = None,
) -> RealDataset:
    """TinyImageNet as the official zip unpacks (``tiny-imagenet-200/``).

    Classes are the 200 wnids of ``wnids.txt`` in sorted order (the order an image-folder
    loader gives), named by ``words.txt``. Train: ``train/<wnid>/images/*.JPEG``. Test: the
    labelled validation split, ``val/images/*.JPEG`` with labels from
    ``val/val_annotations.txt`` (file, wnid, box). Grayscale JPEGs become RGB.
    Normalised with the ImageNet statistics (REFERENCE section 2).
    """
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(TINY_IMAGENET_URL, str(root))
    d = _first_dir(
        "tiny_imagenet",
        [root / "tiny-imagenet-200", root],
        lambda d: (d / "wnids.txt").is_file() and (d / "train").is_dir(),
        "wnids.txt, train/, val/val_annotations.txt",
        f"download {TINY_IMAGENET_URL} and unzip it into root (no reorganisation "
        "needed), or get_dataset('tiny_imagenet', root=..., download=True)",
    )
    wnids = sorted({w.strip() for w in (d / "wnids.txt").read_text().splitlines() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if (d / "words.txt").is_file():
        for line in (d / "words.txt").read_text(encoding="utf-8").splitlines():
            parts = line.split("\t", 1)
            if len(parts) == 2:
                words[parts[0].strip()] = parts[1].strip()
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        img_dir = d / "train" / w / "images"
        if not img_dir.is_dir():
            raise DatasetFormatError(f"{img_dir}: missing (wnid {w} is listed in wnids.txt)")
        files = _image_files(img_dir)
        train_paths += files
        train_labels += [index[w]] * len(files)
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise _missing("tiny_imagenet", [str(ann)], [f"unzip {TINY_IMAGENET_URL} again"])
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetFormatError(f"{ann}:{n}: expected '<file> <wnid> ...', got {line!r}")
        test_paths.append(d / "val" / "images" / parts[0])
        test_labels.append(index[parts[1]])
    size = image_size if image_size is not None else 64
    return RealDataset(
        name="tiny_imagenet",
        train_data=load_images(train_paths, 3, size, workers),
        train_labels=torch.tensor(train_labels, dtype=torch.long),
        test_data=load_images(test_paths, 3, size, workers),
        test_labels=torch.tensor(test_labels, dtype=torch.long),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=tuple(words.get(w, w) for w in wnids),
        source=str(d),
    )


@register_dataset("image_folder")
def load_image_folder(
    root: Path,
    image_size: int | Sequence[int] | None = None,
    channels: int = 3,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset_name: str = "image_folder",
    workers: int | None = None,
) -> RealDataset:
    """A class-per-folder image set.

    Layout ``root/train/<class>/*`` and ``root/test/<class>/*``; or only ``root/<class>/*``
    (or ``root/train/<class>/*`` without ``test/``), in which case ``test_fraction`` of
    each class (seeded by ``split_seed``) becomes the test split (:func:`stratified_split`).
    Classes are the sorted training folder names.
    ``mean``/``std`` default to the per-channel statistics of the training images;
    ``dataset_name`` is the ``RealDataset.name`` (recorded in metadata).
    """
    if not root.is_dir():
        raise _missing(
            dataset_name,
            [f"{root}  (needs train/<class>/*.png|jpg and test/<class>/..., or <class>/...)"],
            ["pass root= a directory with one sub-folder of images per class"],
        )
    if (root / "train").is_dir():
        train = _class_dirs(root / "train")
        test = _class_dirs(root / "test") if (root / "test").is_dir() else None
    else:
        train, test = _class_dirs(root), None
    classes = sorted(c for c, files in train.items() if files)
    if not classes:
        raise _missing(
            dataset_name,
            [
                f"{root / 'train' if (root / 'train').is_dir() else root}  (no class folder holds "
                f"images with extensions {', '.join(IMAGE_EXTENSIONS)})"
            ],
            ["put one sub-folder of images per class there"],
        )
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for c in classes for p in train[c]]
    labels = torch.tensor([index[c] for c in classes for _ in train[c]], dtype=torch.long)
    data = load_images(paths, channels, image_size, workers)
    if test is None:
        train_idx, test_idx = stratified_split(labels, test_fraction, split_seed, len(classes))
        x_train, y_train = data[train_idx], labels[train_idx]
        x_test, y_test = data[test_idx], labels[test_idx]
    else:
        unknown = sorted(c for c, files in test.items() if files and c not in index)
        if unknown:
            raise DatasetFormatError(
                f"{root / 'test'}: classes {unknown} have no folder under {root / 'train'}"
            )
        t_paths = [p for c in classes for p in test.get(c, [])]
        y_test = torch.tensor([index[c] for c in classes for _ in test.get(c, [])])
        x_test = load_images(t_paths, channels, image_size, workers)
        if t_paths and x_test.shape[1:] != data.shape[1:]:
            raise DatasetFormatError(
                f"{t_paths[0]}: test images are {tuple(x_test.shape[2:])}, training images "
                f"{tuple(data.shape[2:])}; pass image_size= to resize both"
            )
        x_train, y_train = data, labels
    if mean is None or std is None:
        m, s = _mean_std(x_train)
        mean, std = mean or m, std or s
    return RealDataset(
        name=dataset_name,
        train_data=x_train,
        train_labels=y_train,
        test_data=x_test,
        test_labels=y_test.long(),
        mean=tuple(mean),
        std=tuple(std),
        class_names=tuple(classes),
        source=str(root),
    )
