"""ImageNet at the scales of the distillation papers: ``imagenet64`` and ``imagenet_subset``.

Both are registered twice: as a source (:func:`~.sources.register_source`, each split
read a range of rows at a time, for the one-time preparation) and as an in-memory loader
(:func:`~.registry.register_dataset`) that reads every row of that same source, so there
is one reader of each format.

``imagenet64``
    The downsampled ImageNet of Chrabaszcz, Loshchilov & Hutter, "A Downsampled Variant
    of ImageNet as an Alternative to the CIFAR datasets" (arXiv:1707.08819, 2017), in its
    published npz layout: ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` (the
    training split, in that order) and ``val_data.npz`` (the validation split, used as the
    test split). Each npz holds ``data`` uint8 ``[N, 3*s*s]`` (one row per image: the red
    plane, then green, then blue, each row-major, so a row reshapes to ``[3, s, s]``),
    ``labels`` in ``1..1000`` (mapped to ``0..999``) and, in the training files, ``mean``
    (ignored). 1,281,167 training and 50,000 validation images at s = 64.

    Class order: the labels are *not* the sorted-wnid order of the ImageNet folders. The
    authors' conversion scripts (github.com/PatrykChrabaszcz/Imagenet32_Scripts,
    ``utils.py`` / ``map_clsloc.txt``) give each synset the id of the ILSVRC devkit's
    ``map_clsloc.txt`` (label 1 is n02119789 "kit_fox", 2 is n02100735 "English_setter",
    ...); TensorFlow Datasets' ``imagenet_resized`` page warns of the same. So class
    ``k`` is the synset whose map_clsloc id is ``k + 1``, and ``class_names`` are those
    wnids in that order (:data:`IMAGENET64_WNIDS`).

``imagenet_subset``
    The 10-class, 128x128 ImageNet subsets of MTT (Cazenavette et al., "Dataset
    Distillation by Matching Training Trajectories", CVPR 2022), also used by FTD, PAD
    and ATT: ImageNette, ImageWoof, ImageFruit, ImageMeow, ImageSquawk, ImageYellow
    (``subset=``), read from the ImageNet JPEG folders as released: ``train/<wnid>/*.JPEG``
    and ``val/<wnid>/*.JPEG`` (or ILSVRC2012's flat ``val/`` with ``LOC_val_solution.csv``).
    The validation images of the 10 classes are the test split. Label ``i`` is the
    ``i``-th class of the published list (:data:`IMAGENET_SUBSETS`), as in MTT's
    reference code, which maps the ImageNet target ``classes[i]`` to ``i``.

    Resizing: MTT's reference code (``utils.py``, ``get_dataset``, ``im_size = (128,
    128)``) applies ``ToTensor``, ``Normalize``, ``Resize(im_size)``, ``CenterCrop(im_size)``.
    With a (height, width) pair, ``Resize`` sets *both* sides to 128, so the aspect ratio
    is not kept and the centre crop changes nothing; on a tensor, with the torchvision of
    its environment (0.12), the bilinear resize has no antialiasing. ``resize="stretch"``
    (the default) does exactly that (bilinear, half-pixel centres, no antialiasing) on the
    8-bit pixels and rounds back to uint8 (the normalisation is per-channel affine, so it
    commutes with the resize). ``resize="center_crop"`` instead scales the shorter side to
    ``image_size`` with PIL's bilinear filter (antialiased when shrinking), the longer side
    to ``int(image_size * long / short)``, then crops the centre square (offsets
    ``round((side - image_size) / 2)``): the aspect-preserving ``Resize(int)`` +
    ``CenterCrop`` convention. Grayscale and CMYK JPEGs are converted to RGB first.

Both use the ImageNet normalisation constants (:data:`~.loaders.IMAGENET_MEAN` /
:data:`~.loaders.IMAGENET_STD`). The 1000 wnids (sorted, with their downsampled-ImageNet
ids) are package data, ``imagenet_wnids.txt``.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InputError, MissingFileError
from .container import DatasetFormatError, RealDataset
from .formats import IMAGE_EXTENSIONS
from .loaders import IMAGENET_MEAN, IMAGENET_STD, _missing
from .registry import register_dataset
from .sources import DatasetSource, SplitSource, dataset_from_source, register_source

__all__ = [
    "IMAGENET64_FILES",
    "IMAGENET_SUBSETS",
    "IMAGENET_SUBSET_INDICES",
    "imagenet64_source",
    "imagenet_subset_source",
    "imagenet_wnids",
    "load_imagenet64",
    "load_imagenet_subset",
]

IMAGENET64_URL = "https://image-net.org/download-images.php (Downsampled ImageNet 64x64)"
IMAGENET_URL = "https://image-net.org/challenges/LSVRC/2012/ (ILSVRC2012 train / val images)"
_WNID_FILE = Path(__file__).with_name("imagenet_wnids.txt")


# --------------------------------------------------------------------------- the wnids

@lru_cache(maxsize=1)
def _wnid_table() -> tuple[tuple[str, int, str], ...]:
    rows = []
    for line in _WNID_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            wnid, clsloc, name = line.split("\t")
            rows.append((wnid, int(clsloc), name))
    return tuple(rows)


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K wnids in sorted order (index = class of a sorted ImageNet folder)."""
    return tuple(w for w, _, _ in _wnid_table())


def _imagenet64_wnids() -> tuple[str, ...]:
    """The wnids by downsampled-ImageNet label: entry k is the synset of label k + 1."""
    return tuple(w for w, _, _ in sorted(_wnid_table(), key=lambda r: r[1]))


#: The MTT subsets: indices into the sorted ImageNet-1K wnids, in the published (label)
#: order, from MTT's reference code (GeorgeCazenavette/mtt-distillation, utils.py, Config).
IMAGENET_SUBSET_INDICES = {
    # tench, English springer, cassette player, chain saw, church, French horn,
    # garbage truck, gas pump, golf ball, parachute
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    # Australian terrier, Border terrier, Samoyed, beagle, Shih-Tzu, English foxhound,
    # Rhodesian ridgeback, dingo, golden retriever, Old English sheepdog
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    # pineapple, banana, strawberry, orange, lemon, pomegranate, fig, bell pepper,
    # cucumber, Granny Smith
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    # bee, yellow lady's slipper, banana, lemon, corn, school bus, honeycomb, lion,
    # black and gold garden spider, goldfinch
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
    # tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat, lion, tiger, jaguar,
    # snow leopard, lynx
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    # peacock, flamingo, macaw, pelican, king penguin, bald eagle, toucan, ostrich,
    # black swan, sulphur-crested cockatoo
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
}

#: The same subsets by wnid (label i = entry i): the indices through the sorted wnids
#: (imagenette: n01440764, n02102040, n02979186, ...).
IMAGENET_SUBSETS: dict[str, tuple[str, ...]] = {
    name: tuple(imagenet_wnids()[i] for i in idx) for name, idx in IMAGENET_SUBSET_INDICES.items()
}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ------------------------------------------------------------------------ imagenet64

#: The files of the published npz release, per split.
IMAGENET64_FILES = {
    "train": tuple(f"train_data_batch_{i}.npz" for i in range(1, 11)),
    "test": ("val_data.npz",),
}


def _imagenet64_dirs(root: Path, resolution: int) -> list[Path]:
    """Where the npz files may lie: ``root``, ``root/imagenet<res>`` and, under either,
    the folders the release's zips unpack to."""
    dirs = []
    for base in (root, root / f"imagenet{resolution}"):
        dirs.append(base)
        dirs += [base / f"Imagenet{resolution}_{part}_npz"
                 for part in ("train", "train_part1", "train_part2", "val")]
    return list(dict.fromkeys(dirs))


def _npz_error(path: Path, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: {what}; download the downsampled ImageNet npz file again")


def _open_npz(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _npz_error(path, f"cannot be read ({_one_line(e)})") from e
    if magic != b"PK\x03\x04":
        raise _npz_error(path, "not an npz archive (a zip of .npy arrays: it does not start "
                         f"with the zip signature; {len(magic)}-byte start {magic!r})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _npz_error(path, f"not a readable npz file ({_one_line(e)})") from e
    if not hasattr(npz, "files"):
        raise _npz_error(path, "a single .npy array, not an npz archive of 'data' and 'labels'")
    return npz


def _npz_member(npz: Any, key: str, path: Path) -> np.ndarray:
    if key not in npz.files:
        raise _npz_error(path, f"missing the array {key!r} (holds {', '.join(npz.files)})")
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _npz_error(path, f"corrupt or truncated array {key!r} ({_one_line(e)})") from e


def _npz_header(npz: Any, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the member ``key`` from its .npy header (no data read)."""
    from numpy.lib import format as npy

    if key not in npz.files:
        raise _npz_error(path, f"missing the array {key!r} (holds {', '.join(npz.files)})")
    try:
        with npz.zip.open(f"{key}.npy") as f:
            version = npy.read_magic(f)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _npz_error(path, f"corrupt or truncated array {key!r} ({_one_line(e)})") from e
    return tuple(int(s) for s in shape), np.dtype(dtype)


class _NpzRows:
    """Rows of a split stored as consecutive npz files, read by global row ranges.

    Built from the files' ``labels`` and ``data`` headers only; :meth:`read` loads the
    ``data`` of each file it touches (an npz member cannot be memory-mapped) and keeps the
    last one, so reading a split in increasing chunks loads each file once.
    """

    def __init__(self, files: Sequence[Path], resolution: int) -> None:
        self.files = list(files)
        self.side = resolution
        labels, counts = [], []
        for path in self.files:
            npz = _open_npz(path)
            with npz:
                shape, dtype = _npz_header(npz, "data", path)
                lab = _npz_member(npz, "labels", path)
            width = 3 * resolution * resolution
            if len(shape) != 2 or dtype != np.uint8:
                raise _npz_error(path, f"'data' is {dtype} {shape}, expected uint8 [N, {width}]")
            if shape[1] != width:
                side = int(round((shape[1] / 3) ** 0.5))
                hint = (f"{side} px images: pass resolution={side}" if 3 * side * side == shape[1]
                        else "not 3*s*s wide")
                raise _npz_error(path, f"'data' rows hold {shape[1]} values, expected {width} "
                                 f"(3x{resolution}x{resolution}); {hint}")
            if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
                raise _npz_error(path, f"'labels' is {lab.dtype} {lab.shape}, expected "
                                 "integers [N]")
            if lab.shape[0] != shape[0]:
                raise _npz_error(path, f"'data' has {shape[0]} rows but 'labels' {lab.shape[0]}")
            if lab.size and (lab.min() < 1 or lab.max() > 1000):
                raise _npz_error(path, f"'labels' must lie in 1..1000, found "
                                 f"{int(lab.min())}..{int(lab.max())}")
            labels.append(lab.astype(np.int64) - 1)
            counts.append(int(shape[0]))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.count = int(self.offsets[-1])
        self._cached: tuple[int, np.ndarray] | None = None

    def _data(self, k: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # let the previous file's array go before loading the next
            path = self.files[k]
            npz = _open_npz(path)
            with npz:
                data = _npz_member(npz, "data", path)
            expected = (int(self.offsets[k + 1] - self.offsets[k]), 3 * self.side ** 2)
            if data.shape != expected or data.dtype != np.uint8:
                raise _npz_error(path, f"'data' changed since it was opened: {data.dtype} "
                                 f"{data.shape}, expected uint8 {expected}")
            self._cached = (k, data)
        return self._cached[1]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= start < stop <= self.count:
            raise InputError(f"rows {start}..{stop - 1} are outside 0..{self.count - 1}")
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for k in range(first, len(self.files)):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            if lo >= stop:
                break
            if hi > start:
                parts.append(self._data(k)[max(start, lo) - lo:min(stop, hi) - lo])
        # a copy: a view would keep the cached file's whole array alive
        codes = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        return codes.reshape(-1, 3, self.side, self.side), self.labels[start:stop].copy()


@register_source("imagenet64")
def imagenet64_source(root: Path, resolution: int = 64) -> DatasetSource:
    """The downsampled ImageNet (npz release) as a :class:`DatasetSource`.

    Each file is looked for in ``root``, ``root/imagenet64`` and, under either, the
    folders ``Imagenet64_train_npz``, ``Imagenet64_train_part1_npz``,
    ``Imagenet64_train_part2_npz`` and ``Imagenet64_val_npz``. ``resolution`` is the
    image side the files must hold (64; the 32 and 16 px releases share the layout).
    """
    resolution = int(resolution)
    if resolution < 1:
        raise InputError(f"imagenet64: resolution must be a positive image side, got {resolution}")
    dirs = _imagenet64_dirs(root, resolution)
    found: dict[str, Path] = {}
    for split_files in IMAGENET64_FILES.values():
        for name in split_files:
            hit = next((d / name for d in dirs if (d / name).is_file()), None)
            if hit is not None:
                found[name] = hit
    lacking = [n for files in IMAGENET64_FILES.values() for n in files if n not in found]
    if lacking:
        raise _missing(
            "imagenet64",
            [str(d) for d in dirs],
            [f"missing in all of them: {', '.join(lacking)}",
             f"download the npz release of the {resolution}x{resolution} downsampled ImageNet "
             f"(train and val zips) from {IMAGENET64_URL} and unzip them into root"],
        )
    splits = {}
    for split, names in IMAGENET64_FILES.items():
        rows = _NpzRows([found[n] for n in names], resolution)
        splits[split] = SplitSource(rows.count, (3, resolution, resolution), rows.read,
                                    files=[str(p) for p in rows.files], labels=rows.labels)
    return DatasetSource(
        name="imagenet64",
        class_names=_imagenet64_wnids(),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train=splits["train"],
        test=splits["test"],
        source=str(found[IMAGENET64_FILES["train"][0]].parent),
        settings={"resolution": resolution},
    )


@register_dataset("imagenet64")
def load_imagenet64(root: Path, resolution: int = 64) -> RealDataset:
    """The downsampled ImageNet in memory (every row of :func:`imagenet64_source`); at 64 px
    the training split alone is 15.7 GB of uint8."""
    return dataset_from_source(imagenet64_source(root, resolution=resolution))


# ------------------------------------------------------------------- imagenet_subset

RESIZE_MODES = ("stretch", "center_crop")


def _subset_wnids(subset: str | None) -> tuple[str, tuple[str, ...]]:
    names = ", ".join(IMAGENET_SUBSETS)
    if subset is None:
        raise InputError(f"imagenet_subset needs subset= one of {names}")
    key = str(subset).strip().lower()
    if key not in IMAGENET_SUBSETS:
        raise InputError(f"imagenet_subset: unknown subset {subset!r}; choose one of {names}")
    return key, IMAGENET_SUBSETS[key]


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_files(split_dir: Path, wnids: Sequence[str], subset: str) -> list[list[Path]]:
    # the full ImageNet folder holds the other 990 synsets (ignored), but a folder that
    # is no ImageNet-1K synset at all says the folder is not the released one
    known = set(imagenet_wnids())
    strays = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in known)
    if strays:
        raise DatasetFormatError(
            f"{split_dir / strays[0]}: not an ImageNet-1K synset folder ({len(strays)} such "
            f"in {split_dir}); {split_dir} must hold ImageNet's wnid folders only: move it out")
    files = []
    for w in wnids:
        d = split_dir / w
        if not d.is_dir():
            raise MissingFileError(
                f"{d}: missing folder of synset {w} (class {len(files)} of {subset}); "
                f"unpack the full ImageNet {split_dir.name}/ folder (one folder per wnid)")
        found = _images_in(d)
        if not found:
            raise MissingFileError(f"{d}: holds no images of synset {w}; unpack it again")
        files.append(found)
    return files


def _flat_val_files(val_dir: Path, csv: Path, wnids: Sequence[str]) -> list[list[Path]]:
    """Per class, the images of ILSVRC2012's flat val folder whose label in
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``, first token the wnid) is it."""
    index = {w: i for i, w in enumerate(wnids)}
    files: list[list[Path]] = [[] for _ in wnids]
    lines = csv.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        image_id, _, prediction = line.partition(",")
        tokens = prediction.split()
        if not image_id or not tokens:
            raise DatasetFormatError(f"{csv}:{n}: expected 'ImageId,<wnid> ...', got {line!r}")
        if tokens[0] in index:
            files[index[tokens[0]]].append(val_dir / f"{image_id.strip()}.JPEG")
    for w, found in zip(wnids, files, strict=True):
        if not found:
            raise DatasetFormatError(f"{csv}: lists no validation image of synset {w}")
    return [sorted(f) for f in files]


def _decode(path: Path, size: int, resize: str) -> np.ndarray:
    """One image file as uint8 ``[3, size, size]`` (see the module docstring for ``resize``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resize == "center_crop":
                w, h = im.size
                if w <= h:
                    ow, oh = size, int(size * h / w)
                else:
                    ow, oh = int(size * w / h), size
                if (ow, oh) != (w, h):
                    im = im.resize((ow, oh), Image.BILINEAR)
                left, top = int(round((ow - size) / 2.0)), int(round((oh - size) / 2.0))
                im = im.crop((left, top, left + size, top + size))
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
            pixels = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(
            f"{path}: not a readable image ({_one_line(e)}); replace or delete the file") from e
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float()[None]
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def _image_split(paths: Sequence[Path], labels: np.ndarray, size: int, resize: str,
                 workers: int | None) -> SplitSource:
    paths = list(paths)

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= start < stop <= len(paths):
            raise InputError(f"rows {start}..{stop - 1} are outside 0..{len(paths) - 1}")
        out = np.empty((stop - start, 3, size, size), dtype=np.uint8)

        def work(i: int) -> None:
            out[i - start] = _decode(paths[i], size, resize)

        n_workers = workers if workers is not None else 1
        if n_workers <= 1 or stop - start < 16:
            for i in range(start, stop):
                work(i)
        else:
            with ThreadPoolExecutor(n_workers) as ex:
                list(ex.map(work, range(start, stop)))
        return out, labels[start:stop].copy()

    return SplitSource(len(paths), (3, size, size), read, files=[str(p) for p in paths],
                       labels=labels)


def _flatten(per_class: Sequence[Sequence[Path]]) -> tuple[list[Path], np.ndarray]:
    paths = [p for files in per_class for p in files]
    labels = np.array([c for c, files in enumerate(per_class) for _ in files], dtype=np.int64)
    return paths, labels


@register_source("imagenet_subset")
def imagenet_subset_source(
    root: Path,
    subset: str | None = None,
    image_size: int = 128,
    resize: str = "stretch",
    workers: int | None = None,
) -> DatasetSource:
    """An MTT ImageNet subset as a :class:`DatasetSource` (the module docstring has the facts).

    ``root`` (or ``root/imagenet``, or the Kaggle release's ``root/ILSVRC/Data/CLS-LOC``)
    holds ``train/<wnid>/`` and ``val/<wnid>/`` (or a flat ``val/`` with
    ``LOC_val_solution.csv`` beside it or in ``root``); folders of other synsets are
    ignored. Rows are grouped by label, files sorted by name within a class. ``workers``
    threads decode a chunk (default 1).
    """
    key, wnids = _subset_wnids(subset)
    size = int(image_size)
    if size < 1:
        raise InputError(f"imagenet_subset: image_size must be positive, got {image_size}")
    if resize not in RESIZE_MODES:
        raise InputError(f"imagenet_subset: resize must be one of {', '.join(RESIZE_MODES)}, "
                         f"got {resize!r}")
    dirs = list(dict.fromkeys([root, root / "imagenet", root / "ILSVRC" / "Data" / "CLS-LOC"]))
    d = next((d for d in dirs if (d / "train").is_dir() and (d / "val").is_dir()), None)
    if d is None:
        raise _missing(
            "imagenet_subset",
            [f"{d}  (needs train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)" for d in dirs],
            [f"download and unpack the ILSVRC2012 training and validation images ({IMAGENET_URL})"
             " into root/train/<wnid>/ and root/val/<wnid>/ (torchvision's ImageNet layout), "
             "or the Kaggle release (ILSVRC/Data/CLS-LOC with LOC_val_solution.csv)"],
        )
    train = _class_files(d / "train", wnids, key)
    val_dir = d / "val"
    if any((val_dir / w).is_dir() for w in wnids):
        test = _class_files(val_dir, wnids, key)
    else:
        csvs = [c / "LOC_val_solution.csv" for c in dict.fromkeys([d, root, val_dir])]
        csv = next((c for c in csvs if c.is_file()), None)
        if csv is None:
            raise MissingFileError(
                f"{val_dir}: holds no folder of the {key} synsets and no LOC_val_solution.csv "
                f"was found (looked for {', '.join(map(str, csvs))}); put the validation images "
                "in val/<wnid>/ folders")
        test = _flat_val_files(val_dir, csv, wnids)
    splits = [_image_split(paths, labels, size, resize, workers)
              for paths, labels in (_flatten(train), _flatten(test))]
    return DatasetSource(key, wnids, IMAGENET_MEAN, IMAGENET_STD, *splits, source=str(d),
                         settings={"subset": key, "image_size": size, "resize": resize})


@register_dataset("imagenet_subset")
def load_imagenet_subset(root: Path, **kwargs: Any) -> RealDataset:
    """An MTT ImageNet subset in memory: every row of :func:`imagenet_subset_source`
    (its keywords: ``subset``, ``image_size``, ``resize``, ``workers``)."""
    return dataset_from_source(imagenet_subset_source(root, **kwargs))
