"""imagenet64 and imagenet_subset read the published formats (files generated here, tiny)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_distill.data.datasets import DatasetFormatError, get_dataset
from lightning_distill.data.datasets.imagenet import (
    IMAGENET_SUBSET_INDICES,
    IMAGENET_SUBSETS,
    imagenet_wnids,
)
from lightning_distill.data.datasets.sources import get_source
from lightning_distill.errors import InputError, MissingFileError

# ---------------------------------------------------------------------- imagenet64

TRAIN_COUNTS = (6, 4, 5, 3, 7, 2, 4, 5, 3, 6)  # rows of train_data_batch_1..10
VAL_COUNT = 9


def _rows(rng: np.random.Generator, n: int, side: int = 64) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * side * side), dtype=np.uint8)


def _write_npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _write_imagenet64(root: Path, side: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """The release's layout: batches 1-5 in Imagenet64_train_part1_npz, 6-10 in ..._part2_npz,
    val_data.npz in Imagenet64_val_npz; labels 1..1000 (0-based truth returned)."""
    rng = np.random.default_rng(seed)
    data, labels = [], []
    for i, n in enumerate(TRAIN_COUNTS, 1):
        x, y = _rows(rng, n, side), rng.integers(1, 1001, size=n)
        y[0] = 1 if i == 1 else y[0]
        y[-1] = 1000 if i == 10 else y[-1]
        folder = root / f"Imagenet{side}_train_part{1 if i <= 5 else 2}_npz"
        _write_npz(folder / f"train_data_batch_{i}.npz", compressed=i % 2 == 0, data=x,
                   labels=y, mean=x.mean(0))
        data.append(x)
        labels.append(y)
    xv, yv = _rows(rng, VAL_COUNT, side), rng.integers(1, 1001, size=VAL_COUNT)
    _write_npz(root / f"Imagenet{side}_val_npz" / "val_data.npz", data=xv, labels=yv)
    return {"train_data": np.concatenate(data), "train_labels": np.concatenate(labels) - 1,
            "test_data": xv, "test_labels": yv - 1}


@pytest.fixture
def npz_root(tmp_path):
    return tmp_path, _write_imagenet64(tmp_path)


def test_imagenet64_loads_labels_and_pixels_exactly(npz_root):
    root, truth = npz_root
    ds = get_dataset("imagenet64", root)
    assert ds.train_data.shape == (sum(TRAIN_COUNTS), 3, 64, 64)
    assert ds.test_data.shape == (VAL_COUNT, 3, 64, 64)
    assert ds.train_data.dtype == torch.uint8
    for split in ("train", "test"):
        labels = getattr(ds, f"{split}_labels")
        assert torch.equal(labels, torch.from_numpy(truth[f"{split}_labels"]))  # 1..1000 -> 0..999
        rows = truth[f"{split}_data"]
        codes = getattr(ds, f"{split}_data").numpy()
        # a row is the red plane, then green, then blue, each 64x64 row-major
        for c in range(3):
            plane = rows[:, c * 4096:(c + 1) * 4096].reshape(-1, 64, 64)
            assert np.array_equal(codes[:, c], plane)
    assert ds.train_labels.min() == 0 and ds.train_labels.max() == 999
    assert ds.num_classes == 1000
    assert ds.mean == pytest.approx((0.485, 0.456, 0.406))
    assert ds.std == pytest.approx((0.229, 0.224, 0.225))


def test_imagenet64_classes_follow_the_release_label_order_not_sorted_wnids(npz_root):
    """Label k is the synset of map_clsloc id k + 1 (Chrabaszcz et al.'s scripts)."""
    ds = get_dataset("imagenet64", npz_root[0])
    assert ds.class_names[:3] == ("n02119789", "n02100735", "n02110185")  # kit fox, ...
    assert ds.class_names[448] == "n01440764"  # tench: map_clsloc 449, sorted index 0
    assert sorted(ds.class_names) == list(imagenet_wnids())
    assert len(set(ds.class_names)) == 1000


def test_imagenet64_source_reads_row_ranges_across_files(npz_root, monkeypatch):
    root, truth = npz_root
    ds = get_dataset("imagenet64", root)
    src = get_source("imagenet64", root)
    train = src.train
    assert train.count == sum(TRAIN_COUNTS) and train.image_shape == (3, 64, 64)
    assert np.array_equal(train.labels, truth["train_labels"])  # known up front
    assert np.array_equal(src.test.labels, truth["test_labels"])
    assert [Path(f).name for f in train.files] == [f"train_data_batch_{i}.npz"
                                                   for i in range(1, 11)]
    ends = np.cumsum(TRAIN_COUNTS)
    for start, stop in [(0, train.count), (3, 17), (5, 6), (6, 7), (int(ends[3]) - 1, 40),
                        (train.count - 1, train.count)]:
        codes, labels = train.read(start, stop)
        assert codes.shape == (stop - start, 3, 64, 64) and codes.dtype == np.uint8
        assert np.array_equal(codes, ds.train_data[start:stop].numpy())
        assert np.array_equal(labels, ds.train_labels[start:stop].numpy())
    # sequential chunked reading loads each file once
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: loads.append(Path(path).name)
                        or real_load(path, *a, **k))
    fresh = get_source("imagenet64", root).train
    loads.clear()
    for start in range(0, fresh.count, 4):
        fresh.read(start, min(start + 4, fresh.count))
    assert sorted(loads) == sorted(f"train_data_batch_{i}.npz" for i in range(1, 11))
    assert src.settings == {"resolution": 64}


def test_imagenet64_found_in_root_itself_and_other_resolutions(tmp_path):
    _write_imagenet64(tmp_path / "a", side=16)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (tmp_path / "a").rglob("*.npz"):
        f.rename(flat / f.name)
    ds = get_dataset("imagenet64", flat, resolution=16)
    assert ds.train_data.shape[1:] == (3, 16, 16)
    with pytest.raises(DatasetFormatError) as err:
        get_source("imagenet64", flat)
    msg = str(err.value)
    assert "train_data_batch_1.npz" in msg and "resolution=16" in msg and "\n" not in msg


def test_imagenet64_missing_lists_every_path_looked_at(tmp_path):
    with pytest.raises(MissingFileError) as err:
        get_dataset("imagenet64", tmp_path)
    msg = str(err.value)
    for d in (tmp_path, tmp_path / "imagenet64", tmp_path / "Imagenet64_train_npz",
              tmp_path / "imagenet64" / "Imagenet64_val_npz"):
        assert f"  - {d}\n" in msg
    assert "missing in all of them: train_data_batch_1.npz," in msg and "val_data.npz" in msg


def _bad(path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    n = 4
    x, y = _rows(rng, n), rng.integers(1, 1001, size=n)
    if kind == "truncated":
        _write_npz(path, data=x, labels=y)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "not_npz":
        path.write_bytes(b"this is not a zip archive at all" * 10)
    elif kind == "no_labels":
        _write_npz(path, data=x)
    elif kind == "no_data":
        _write_npz(path, labels=y)
    elif kind == "width":
        _write_npz(path, data=x[:, :-3], labels=y)
    elif kind == "dtype":
        _write_npz(path, data=x.astype(np.float32), labels=y)
    elif kind == "lengths":
        _write_npz(path, data=x, labels=y[:-1])
    elif kind in ("label0", "label1001"):
        y[1] = 0 if kind == "label0" else 1001
        _write_npz(path, data=x, labels=y)


@pytest.mark.parametrize("kind", ["truncated", "not_npz", "no_labels", "no_data", "width",
                                  "dtype", "lengths", "label0", "label1001"])
@pytest.mark.parametrize("target", ["train_data_batch_7.npz", "val_data.npz"])
def test_imagenet64_bad_files_name_the_file_in_one_line(npz_root, kind, target):
    root = npz_root[0]
    path = next(root.rglob(target))
    _bad(path, kind)
    for get in (get_source, get_dataset):
        with pytest.raises(DatasetFormatError) as err:
            get("imagenet64", root)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg


def test_imagenet64_corrupt_data_body_is_caught_when_read(npz_root):
    root = npz_root[0]
    path = next(root.rglob("train_data_batch_2.npz"))  # written compressed
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("data.npy")
        body = info.header_offset + 30 + len(info.filename) + len(info.extra)
        size = info.compress_size
    raw = bytearray(path.read_bytes())
    for k in range(body + size // 3, body + size // 3 + 64):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))
    train = get_source("imagenet64", root).train  # headers and labels are intact
    train.read(0, TRAIN_COUNTS[0])
    with pytest.raises(DatasetFormatError) as err:
        train.read(0, TRAIN_COUNTS[0] + 1)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ imagenet_subset

NETTE = IMAGENET_SUBSETS["imagenette"]
#: (width, height, mode) of the images written per class, cycling
SHAPES = [(160, 120, "RGB"), (90, 200, "L"), (128, 128, "RGB"), (300, 140, "CMYK"),
          (130, 129, "RGB")]


def _jpeg(path: Path, w: int, h: int, mode: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                     ((xx + yy) * 7) % 256], -1).astype(np.int16)
    noise = rng.integers(-20, 21, size=base.shape)
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    im = rgb.convert(mode) if mode != "RGB" else rgb
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90)
    return path


def _write_imagenet_folders(root: Path, per_class: int = 2, flat_val: bool = False) -> None:
    k = 0
    for c, w in enumerate(NETTE):
        for j in range(per_class):
            iw, ih, mode = SHAPES[k % len(SHAPES)]
            _jpeg(root / "train" / w / f"{w}_{j + 1}.JPEG", iw, ih, mode, k)
            k += 1
        iw, ih, mode = SHAPES[c % len(SHAPES)]
        if flat_val:
            _jpeg(root / "val" / f"ILSVRC2012_val_{c + 1:08d}.JPEG", iw, ih, mode, 100 + c)
        else:
            _jpeg(root / "val" / w / f"ILSVRC2012_val_{c + 1:08d}.JPEG", iw, ih, mode, 100 + c)
    # a synset outside the subset (the full ImageNet holds 1000): ignored
    _jpeg(root / "train" / "n01443537" / "n01443537_1.JPEG", 50, 40, "RGB", 999)
    if flat_val:
        _jpeg(root / "val" / "ILSVRC2012_val_00000099.JPEG", 50, 40, "RGB", 998)
        lines = ["ImageId,PredictionString"]
        lines += [f"ILSVRC2012_val_{c + 1:08d},{w} 1 2 30 40" for c, w in enumerate(NETTE)]
        lines += ["ILSVRC2012_val_00000099,n01443537 1 2 3 4"]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def jpeg_root(tmp_path):
    _write_imagenet_folders(tmp_path)
    return tmp_path


def test_subset_lists_are_the_published_indices_into_sorted_wnids():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    assert set(IMAGENET_SUBSETS) == {"imagenette", "imagewoof", "imagefruit", "imageyellow",
                                     "imagemeow", "imagesquawk"}
    for name, idx in IMAGENET_SUBSET_INDICES.items():
        assert IMAGENET_SUBSETS[name] == tuple(wnids[i] for i in idx)
        assert len(set(IMAGENET_SUBSETS[name])) == 10
    # the published classes by name: ImageNette (tench ... parachute), ImageWoof's first
    assert IMAGENET_SUBSETS["imagenette"] == (
        "n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
        "n03417042", "n03425413", "n03445777", "n03888257")
    assert IMAGENET_SUBSETS["imagewoof"][:2] == ("n02096294", "n02093754")
    assert IMAGENET_SUBSETS["imagesquawk"][0] == "n01806143"  # peacock


def _reference_stretch(path: Path, size: int = 128) -> np.ndarray:
    """MTT's transform: ToTensor, Resize((size, size)) on the tensor (bilinear, no
    antialiasing in its torchvision), CenterCrop(size) (a no-op then); back to 8 bits."""
    import torchvision.transforms.functional as TF

    with Image.open(path) as im:
        x = TF.to_tensor(im.convert("RGB"))
    x = TF.resize(x, [size, size], antialias=False)
    x = TF.center_crop(x, [size, size])
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _pil_center_crop(path: Path, size: int = 128) -> np.ndarray:
    """Shorter side to ``size`` with PIL bilinear, then the centre square, by hand."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        ow, oh = (size, int(h * s)) if w <= h else (int(w * s), size)
        im = im.resize((ow, oh), Image.BILINEAR)
        left, top = round((ow - size) / 2), round((oh - size) / 2)
        return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def test_subset_loads_classes_in_the_published_order(jpeg_root):
    ds = get_dataset("imagenet_subset", jpeg_root, subset="ImageNette")  # case-insensitive
    assert ds.class_names == NETTE and ds.num_classes == 10
    assert ds.train_data.shape == (20, 3, 128, 128) and ds.test_data.shape == (10, 3, 128, 128)
    assert ds.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert ds.test_labels.tolist() == list(range(10))
    src = get_source("imagenet_subset", jpeg_root, subset="imagenette")
    # rows grouped by label, each from its class's folder (the extra synset is ignored)
    for f, label in zip(src.train.files, src.train.labels, strict=True):
        assert Path(f).parent.name == NETTE[label]
    assert np.array_equal(src.train.labels, ds.train_labels.numpy())  # known up front
    assert src.settings == {"subset": "imagenette", "image_size": 128, "resize": "stretch"}
    assert ds.mean == pytest.approx((0.485, 0.456, 0.406))


def test_subset_default_resize_is_the_reference_transform(jpeg_root):
    src = get_source("imagenet_subset", jpeg_root, subset="imagenette")
    codes, _ = src.train.read(0, src.train.count)
    for i, f in enumerate(src.train.files):
        ref = _reference_stretch(Path(f))
        # the same bilinear weights; only float rounding (x/255 there) may differ by one code
        assert np.abs(codes[i].astype(int) - ref.astype(int)).max() <= 1, f
        assert (codes[i] != ref).mean() < 0.01, f
    assert codes.shape[1:] == (3, 128, 128)


def test_subset_center_crop_equals_pil_resize_and_crop(jpeg_root):
    import torchvision.transforms as T

    ds = get_dataset("imagenet_subset", jpeg_root, subset="imagenette", resize="center_crop")
    src = get_source("imagenet_subset", jpeg_root, subset="imagenette", resize="center_crop")
    tv = T.Compose([T.Resize(128), T.CenterCrop(128)])
    for i, f in enumerate(src.train.files):
        with Image.open(f) as im:
            expected = np.asarray(tv(im.convert("RGB"))).transpose(2, 0, 1)
        assert np.array_equal(ds.train_data[i].numpy(), expected), f
    first = Path(src.train.files[0])  # 160x120: landscape, cropped left and right
    assert np.array_equal(ds.train_data[0].numpy(), _pil_center_crop(first))
    tall = Path(src.train.files[1])  # 90x200, grayscale
    assert np.array_equal(ds.train_data[1].numpy(), _pil_center_crop(tall))
    assert ds.train_data[1, 0].equal(ds.train_data[1, 1])  # gray -> equal RGB planes


def test_subset_source_reads_ranges_like_the_loader(jpeg_root):
    ds = get_dataset("imagenet_subset", jpeg_root, subset="imagenette", image_size=32)
    src = get_source("imagenet_subset", jpeg_root, subset="imagenette", image_size=32,
                     workers=2)
    assert src.train.image_shape == (3, 32, 32) and ds.train_data.shape[1:] == (3, 32, 32)
    for start, stop in [(0, 20), (3, 4), (5, 19)]:
        codes, labels = src.train.read(start, stop)
        assert np.array_equal(codes, ds.train_data[start:stop].numpy())
        assert np.array_equal(labels, ds.train_labels[start:stop].numpy())
    codes, labels = src.test.read(0, 10)
    assert np.array_equal(codes, ds.test_data.numpy())


def test_subset_flat_val_folder_with_loc_val_solution(tmp_path):
    _write_imagenet_folders(tmp_path, per_class=1, flat_val=True)
    ds = get_dataset("imagenet_subset", tmp_path, subset="imagenette", image_size=16)
    assert ds.test_labels.tolist() == list(range(10))
    src = get_source("imagenet_subset", tmp_path, subset="imagenette", image_size=16)
    assert [Path(f).name for f in src.test.files] == [f"ILSVRC2012_val_{c + 1:08d}.JPEG"
                                                      for c in range(10)]


@pytest.mark.parametrize("subset", [None, "imagenet", "cifar10"])
def test_subset_must_be_one_of_the_six(jpeg_root, subset):
    with pytest.raises(InputError) as err:
        get_dataset("imagenet_subset", jpeg_root, subset=subset)
    for name in IMAGENET_SUBSETS:
        assert name in str(err.value)


def test_subset_missing_synset_folder(jpeg_root):
    import shutil

    folder = jpeg_root / "train" / NETTE[3]
    shutil.rmtree(folder)
    with pytest.raises(MissingFileError) as err:
        get_source("imagenet_subset", jpeg_root, subset="imagenette")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_subset_folder_that_is_no_imagenet_synset(jpeg_root):
    """Other ImageNet synsets are ignored (the full folder holds 1000); a folder that is
    no ImageNet-1K synset is refused, named, in one line."""
    (jpeg_root / "train" / "n01443537").mkdir(exist_ok=True)  # goldfish: not a nette
    get_source("imagenet_subset", jpeg_root, subset="imagenette")
    stray = jpeg_root / "val" / "n99999999"
    stray.mkdir()
    with pytest.raises(DatasetFormatError) as err:
        get_source("imagenet_subset", jpeg_root, subset="imagenette")
    assert str(stray) in str(err.value) and "\n" not in str(err.value)


def test_subset_file_that_is_not_an_image(jpeg_root):
    bad = jpeg_root / "train" / NETTE[1] / f"{NETTE[1]}_0.JPEG"
    bad.write_bytes(b"not a JPEG at all")
    src = get_source("imagenet_subset", jpeg_root, subset="imagenette")
    src.train.read(0, 2)  # class 0 is fine
    with pytest.raises(DatasetFormatError) as err:
        src.train.read(0, 4)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DatasetFormatError):
        get_dataset("imagenet_subset", jpeg_root, subset="imagenette")


def test_subset_missing_root_lists_paths(tmp_path):
    with pytest.raises(MissingFileError) as err:
        get_dataset("imagenet_subset", tmp_path, subset="imagewoof")
    assert str(tmp_path / "ILSVRC" / "Data" / "CLS-LOC") in str(err.value)


# ------------------------------------------------------------ prepared from the formats

def test_imagenet64_prepared_after_an_interruption_equals_the_files(npz_root, tmp_path):
    """A preparation of the npz release stopped midway is never used; run again it
    resumes at its last chunk (a source file replaced meanwhile would start it over),
    and the prepared split, its class index and a streamed datamodule's batches equal
    the files' rows."""
    from lightning_distill.data.datamodule import RealDataModule
    from lightning_distill.data.prepared import open_prepared, prepare, prepared_dir

    class Stop(Exception):
        pass

    root, truth = npz_root
    source = get_source("imagenet64", root)
    read = source.train.read

    def stop_at_24(a: int, b: int):
        if b > 24:
            raise Stop  # the machine stops while rows 24.. are being read
        return read(a, b)

    source.train.read = stop_at_24
    with pytest.raises(Stop):
        prepare(source, tmp_path / "prepared", chunk_rows=8)
    final = prepared_dir(tmp_path / "prepared", source)
    assert not final.exists() and final.with_name(final.name + ".partial").is_dir()
    with pytest.raises(MissingFileError, match="unfinished preparation"):
        open_prepared(final)
    reads: list[int] = []
    source = get_source("imagenet64", root)
    read = source.train.read
    source.train.read = lambda a, b: reads.append(a) or read(a, b)
    prepare(source, tmp_path / "prepared", chunk_rows=8)
    assert reads[0] == 24  # rows 0..23 were written before the stop
    real = open_prepared(final, verify=True)
    codes = torch.from_numpy(truth["train_data"].reshape(-1, 3, 64, 64))
    assert torch.equal(real.train_data[:], codes)
    assert torch.equal(real.train_labels, torch.from_numpy(truth["train_labels"]))
    for c in torch.unique(real.train_labels).tolist():  # the class index
        rows = torch.nonzero(real.train_labels == c).flatten()
        assert torch.equal(real.indices_of_class(c), rows)
    dm = RealDataModule("imagenet64", root=str(root), prepared=True, hold=False,
                        prepared_root=str(tmp_path / "prepared"), val_fraction=0.0,
                        batch_size=16)
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    want = torch.from_numpy(truth["test_data"][:16].reshape(-1, 3, 64, 64))
    assert torch.equal(x, dm.real.normalize(want.float() / 255))
    assert torch.equal(y, torch.from_numpy(truth["test_labels"][:16]))
