"""The packaged loaders, one per registered data set, and their constants.

Each loader searches ``root`` (and the usual sub-directories) for the official files,
reads them with :mod:`.formats` and returns a :class:`~.container.RealDataset`; a
missing data set raises :class:`FileNotFoundError` listing every path looked at and how
to get the data. Importing this module registers them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InputError, MissingFileError
from .container import DatasetFormatError, RealDataset, mean_std, stratified_split
from .formats import (
    IDX_FILES,
    IMAGE_EXTENSIONS,
    _as_hw,
    class_dirs,
    find_idx_files,
    image_files,
    load_images,
    read_cifar_batch,
    read_idx,
    read_image,
    read_label_names,
    read_svhn_mat,
)
from .registry import register_dataset
from .sources import DatasetSource, SplitSource, dataset_from_source, register_source

__all__ = [
    "image_folder_source",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_mnist",
    "load_svhn",
    "load_tiny_imagenet",
]

# Normalisation constants (docs/method.md, section 'ZCA whitening and normalisation').
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


# ------------------------------------------------------------------- shared helpers

def _missing(name: str, looked: Sequence[str], how: Sequence[str]) -> MissingFileError:
    lines = [f"data set {name!r} not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines += ["How to get it:"] + [f"  - {h}" for h in how]
    lines += ["In a recipe or on the lightning-distill command line: point data.root at the "
              "folder, or set data.kwargs: {download: true} where the loader can download "
              "(--data.root DIR, --data.kwargs '{download: true}')."]
    return MissingFileError("\n".join(lines))


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


# ------------------------------------------------------------------ MNIST family

def _load_idx_dataset(
    name: str,
    dirs: Sequence[Path],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes: tuple[str, ...],
    how: Sequence[str],
) -> RealDataset:
    hit = find_idx_files(dirs)
    if hit is None:
        files = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
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
    train, test = (
        [(arrays[f"{split}_images"][:, None], arrays[f"{split}_labels"].astype(np.int64))]
        for split in ("train", "test")
    )
    return _from_arrays(name, train, test, mean, std, classes, d)


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
    ``root/fashion-mnist``, then the directory of the Debian package
    ``dataset-fashion-mnist``."""
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
    mean, std = mean_std(data[train_idx], 16.0)
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
    train = [read_cifar_batch(d / f, "labels") for f in files[:5]]
    test = read_cifar_batch(d / "test_batch", "labels")
    names = read_label_names(d / "batches.meta", "label_names") or CIFAR10_CLASSES
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
    train = read_cifar_batch(d / "train", f"{kind}_labels")
    test = read_cifar_batch(d / "test", f"{kind}_labels")
    k = 20 if coarse else 100
    names = read_label_names(d / "meta", f"{kind}_label_names") or tuple(str(i) for i in range(k))
    return _from_arrays("cifar100", [train], [test], CIFAR_MEAN, CIFAR_STD, names, d)


# ----------------------------------------------------------------------------- SVHN


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
    parts = [read_svhn_mat(d / f) for f in files]
    train = [parts[0]] + parts[2:]
    return _from_arrays("svhn", train, [parts[1]], SVHN_MEAN, SVHN_STD, DIGIT_CLASSES, d)


# --------------------------------------------------------------------------- images


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
    Normalised with the ImageNet statistics (docs/method.md, section 'ZCA whitening and
    normalisation').
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
        files = image_files(img_dir)
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


def _image_folder_files(
    root: Path, test_fraction: float, split_seed: int, dataset_name: str
) -> tuple[tuple[str, ...], dict[str, tuple[list[Path], Tensor]]]:
    """The classes (sorted training folder names) and, per split, the image files and
    their labels of an image folder (see :func:`load_image_folder` for the layouts)."""
    if not root.is_dir():
        raise _missing(
            dataset_name,
            [f"{root}  (needs train/<class>/*.png|jpg and test/<class>/..., or <class>/...)"],
            ["pass root= a directory with one sub-folder of images per class"],
        )
    if (root / "train").is_dir():
        train = class_dirs(root / "train")
        test = class_dirs(root / "test") if (root / "test").is_dir() else None
    else:
        train, test = class_dirs(root), None
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
    if test is None:
        train_idx, test_idx = stratified_split(labels, test_fraction, split_seed, len(classes))
        splits = {"train": ([paths[i] for i in train_idx.tolist()], labels[train_idx]),
                  "test": ([paths[i] for i in test_idx.tolist()], labels[test_idx])}
    else:
        unknown = sorted(c for c, files in test.items() if files and c not in index)
        if unknown:
            raise DatasetFormatError(
                f"{root / 'test'}: classes {unknown} have no folder under {root / 'train'}"
            )
        t_paths = [p for c in classes for p in test.get(c, [])]
        y_test = torch.tensor([index[c] for c in classes for _ in test.get(c, [])],
                              dtype=torch.long)
        splits = {"train": (paths, labels), "test": (t_paths, y_test)}
    return tuple(classes), splits


@register_dataset("image_folder")
def load_image_folder(root: Path, **kwargs: Any) -> RealDataset:
    """A class-per-folder image set (torchvision's ImageFolder layout), held in memory:
    every row of :func:`image_folder_source` (its keywords, its layouts), read in chunks
    of files; ``mean`` / ``std`` default to the per-channel statistics of the training
    images. A folder too large to hold: ``data.prepared: true`` reads the same source
    into a prepared directory instead."""
    return dataset_from_source(image_folder_source(root, **kwargs))


@register_source("image_folder")
def image_folder_source(
    root: Path,
    image_size: int | Sequence[int] | None = None,
    channels: int = 3,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset_name: str = "image_folder",
    workers: int | None = None,
) -> DatasetSource:
    """A class-per-folder image set of any size as a source (:mod:`.sources`).

    Layout ``root/train/<class>/*`` and ``root/test/<class>/*``; or only ``root/<class>/*``
    (or ``root/train/<class>/*`` without ``test/``), in which case ``test_fraction`` of
    each class (seeded by ``split_seed``) becomes the test split (:func:`stratified_split`).
    Classes are the sorted training folder names. ``channels`` 3 converts to RGB, 1 to
    grayscale; ``image_size`` resizes (bilinear), else every image must have the first
    one's size. Each row range is decoded from its files only (``workers`` threads).
    Without ``mean`` / ``std`` they are measured on the training images (by the in-memory
    loader, or by the preparation). ``dataset_name`` is the data set's name (recorded in
    metadata)."""
    classes, splits = _image_folder_files(root, test_fraction, split_seed, dataset_name)
    size = _as_hw(image_size)
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    first = read_image(Path(splits["train"][0][0]), channels, size)

    def split_source(paths: list[Path], labels: Tensor) -> SplitSource:
        labs = labels.numpy().astype(np.int64)

        def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            codes = load_images(paths[start:stop], channels, size, workers).numpy()
            if codes.shape[1:] != first.shape:
                raise DatasetFormatError(
                    f"{paths[start]}: images {codes.shape[1:]} differ from {first.shape} of "
                    f"{splits['train'][0][0]}; pass image_size= to resize them")
            return codes, labs[start:stop]

        return SplitSource(len(paths), tuple(int(d) for d in first.shape), read,
                           files=[str(root)], labels=labs)

    settings = {"image_size": None if size is None else list(size), "channels": channels,
                "test_fraction": test_fraction, "split_seed": split_seed,
                "mean": None if mean is None else list(mean),
                "std": None if std is None else list(std)}
    return DatasetSource(
        name=dataset_name, class_names=classes,
        mean=None if mean is None or std is None else tuple(mean),
        std=None if mean is None or std is None else tuple(std),
        train=split_source(*splits["train"]), test=split_source(*splits["test"]),
        source=str(root), settings=settings)
