"""Writers of tiny data files in the real on-disk formats, for the loader tests.

Each writer produces exactly the files (names, folders, byte layout, pickle keys,
MATLAB variables) that the official distribution has, so the loaders are tested against
the format rather than against themselves.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def random_images(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """uint8 array [n, *shape] of uniform random pixel codes."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: 00 00 08 <ndim>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` as an idx file (gzipped like the official ``*.gz`` if ``gz``)."""
    data = idx_bytes(array)
    path = Path(str(path) + ".gz") if gz and not str(path).endswith(".gz") else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(
    directory: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    gz: bool = True,
) -> dict[str, Path]:
    """The four MNIST / Fashion-MNIST idx files (images [N, 28, 28] uint8, labels [N])."""
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    return {k: write_idx(Path(directory) / IDX_FILES[k], a, gz) for k, a in arrays.items()}


class Py2Pickler(pickle._Pickler):
    """Pickles as cPickle under Python 2 wrote the CIFAR files: protocol 2, every ``str`` /
    ``bytes`` a Python 2 byte string (SHORT_BINSTRING / BINSTRING opcodes, so they load as
    ``bytes`` with ``encoding="bytes"``), numpy functions under their numpy 1 module
    ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def _cifar_batch(images: np.ndarray, labels: dict[str, np.ndarray], name: str) -> dict:
    n = images.shape[0]
    batch = {
        "batch_label": name,
        "data": np.ascontiguousarray(images, dtype=np.uint8).reshape(n, 3072),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    batch.update({k: [int(v) for v in vals] for k, vals in labels.items()})
    return batch


def write_cifar10(
    root: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    label_names: Sequence[str] | None = None,
) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Images [N, 3, 32, 32] uint8 (stored as rows of 3072 = R plane, G plane, B plane);
    the training images are spread over the five batches in order.
    """
    d = Path(root) / "cifar-10-batches-py"
    chunks = np.array_split(np.arange(train_images.shape[0]), 5)
    for i, idx in enumerate(chunks, 1):
        batch = _cifar_batch(train_images[idx], {"labels": train_labels[idx]}, f"batch {i}")
        _pickle(d / f"data_batch_{i}", batch)
    _pickle(d / "test_batch", _cifar_batch(test_images, {"labels": test_labels}, "test"))
    names = list(label_names) if label_names is not None else [f"c{i}" for i in range(10)]
    _pickle(
        d / "batches.meta",
        {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072},
    )
    return d


def write_cifar100(
    root: Path,
    train_images: np.ndarray,
    train_fine: np.ndarray,
    train_coarse: np.ndarray,
    test_images: np.ndarray,
    test_fine: np.ndarray,
    test_coarse: np.ndarray,
) -> Path:
    """``root/cifar-100-python/{train, test, meta}`` with fine and coarse labels."""
    d = Path(root) / "cifar-100-python"
    for name, x, fine, coarse in (
        ("train", train_images, train_fine, train_coarse),
        ("test", test_images, test_fine, test_coarse),
    ):
        labels = {"fine_labels": fine, "coarse_labels": coarse}
        _pickle(d / name, _cifar_batch(x, labels, name))
    _pickle(
        d / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return d


def write_svhn(root: Path, split: str, images: np.ndarray, digits: np.ndarray) -> Path:
    """``root/<split>_32x32.mat``: X [32, 32, 3, N] uint8 and y [N, 1] with 10 for digit 0."""
    import scipy.io

    x = np.transpose(np.asarray(images, dtype=np.uint8), (2, 3, 1, 0))  # [N,C,H,W] -> [H,W,C,N]
    y = np.asarray(digits, dtype=np.uint8).copy()
    y[y == 0] = 10
    path = Path(root) / f"{split}_32x32.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": x, "y": y.reshape(-1, 1)})
    return path


def _save_image(path: Path, array: np.ndarray, **kw: object) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **kw)


def decode(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image file with PIL as ``mode`` and return uint8 [C, H, W]."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert(mode), dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def write_tiny_imagenet(
    root: Path,
    wnids: Sequence[str],
    train: Mapping[str, Sequence[np.ndarray]],
    val: Sequence[tuple[np.ndarray, str]],
) -> Path:
    """``root/tiny-imagenet-200`` laid out as the official zip unpacks.

    ``wnids.txt`` (in the given order), ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``
    plus ``<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG`` plus ``val/val_annotations.txt``
    (tab-separated file, wnid, box), and an unlabelled ``test/images``. Images are HxWx3 or
    HxW (grayscale, as some real TinyImageNet JPEGs are) uint8 arrays.
    """
    d = Path(root) / "tiny-imagenet-200"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [f"{w}\tname of {w}, alias {w}" for w in wnids] + ["n99999999\tunused class"]
    (d / "words.txt").write_text("\n".join(words) + "\n")
    for w, images in train.items():
        boxes = []
        for i, img in enumerate(images):
            name = f"{w}_{i}.JPEG"
            _save_image(d / "train" / w / "images" / name, img, format="JPEG", quality=95)
            boxes.append(f"{name}\t0\t0\t{img.shape[1] - 1}\t{img.shape[0] - 1}")
        (d / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i, (img, w) in enumerate(val):
        name = f"val_{i}.JPEG"
        _save_image(d / "val" / "images" / name, img, format="JPEG", quality=95)
        lines.append(f"{name}\t{w}\t1\t2\t60\t61")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _save_image(d / "test" / "images" / "test_0.JPEG", np.zeros((64, 64, 3)), format="JPEG")
    return d


def write_image_folder(
    root: Path, images: Mapping[str, Sequence[np.ndarray]], ext: str = "png"
) -> dict[str, list[Path]]:
    """``root/<class>/<i>.<ext>`` for each class; arrays HxWx3 or HxW uint8."""
    out: dict[str, list[Path]] = {}
    for c, arrays in images.items():
        out[c] = []
        for i, a in enumerate(arrays):
            p = Path(root) / c / f"{i:03d}.{ext}"
            _save_image(p, a)
            out[c].append(p)
    return out
