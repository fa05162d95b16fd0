"""Real data set loaders read the official on-disk formats (files written by formats.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_distill.data import datasets as ds
from lightning_distill.data.datasets import (
    DatasetFormatError,
    RealDataset,
    get_dataset,
    list_datasets,
    read_idx,
    register_dataset,
    stratified_split,
)

try:
    from tests.data import formats
except ImportError:  # tests/ without __init__.py and the repo root not on sys.path
    import formats  # type: ignore[no-redef]

NAMES = [
    "cifar10",
    "cifar100",
    "digits",
    "fashion_mnist",
    "image_folder",
    "mnist",
    "svhn",
    "tiny_imagenet",
]


# ------------------------------------------------------------------------- registry


def test_registry_lists_all_names_and_rejects_unknown():
    assert set(NAMES) <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown data set 'imagenet-1k'.*cifar10.*tiny_imagenet"):
        get_dataset("imagenet-1k")


def test_names_match_ignoring_case_dash_underscore(tmp_path):
    # "CIFAR-10" resolves to the cifar10 loader, which then reports the missing files.
    with pytest.raises(FileNotFoundError, match="cifar10"):
        get_dataset("CIFAR-10", root=tmp_path)
    assert get_dataset("Digits").name == "digits"


def test_register_dataset_custom_and_duplicate(tmp_path):
    def tiny(root: Path, k: int = 2) -> RealDataset:
        x = torch.zeros(2 * k, 1, 2, 2, dtype=torch.uint8)
        y = torch.arange(2 * k) % k
        return RealDataset(f"tiny{root.name}", x, y, x, y, (0.5,), (0.5,), tuple("ab"[:k]))

    register_dataset("tiny_test_set", tiny)
    try:
        d = get_dataset("tiny-test-set", root=tmp_path, k=2)
        assert d.name == f"tiny{tmp_path.name}" and d.num_classes == 2
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("TINY_test_set", tiny)
    finally:
        ds._REGISTRY.pop("tiny_test_set")


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ds.DATA_ENV_VAR, str(tmp_path))
    assert ds.default_data_root() == tmp_path
    monkeypatch.delenv(ds.DATA_ENV_VAR)
    assert ds.default_data_root() == Path.home() / ".cache" / "lightning_distill" / "data"


# --------------------------------------------------------------------------- digits


def test_digits_split_shapes_values_and_stats():
    from sklearn.datasets import load_digits

    d = get_dataset("digits")
    assert (d.channels, d.image_size, d.num_classes) == (1, (8, 8), 10)
    assert d.train_images.shape == (1198, 1, 8, 8) and d.test_images.shape == (599, 1, 8, 8)
    assert d.train_images.dtype == torch.float32 and d.train_labels.dtype == torch.int64
    assert d.train_images.min() == 0.0 and d.train_images.max() == 1.0
    # values are exactly the sklearn codes 0..16 divided by 16
    assert torch.equal(d.train_images * 16, (d.train_images * 16).round())
    # stratified 1/3 test split per class
    full = np.bincount(load_digits().target, minlength=10)
    assert d.test_labels.bincount(minlength=10).tolist() == [round(n / 3) for n in full]
    # train + test is exactly the sklearn set (as a multiset of (image, label) rows)
    sk = load_digits()
    ref = sorted(map(tuple, np.c_[sk.images.reshape(-1, 64), sk.target].astype(int).tolist()))
    x = torch.cat([d.train_data, d.test_data]).reshape(-1, 64).long()
    y = torch.cat([d.train_labels, d.test_labels])[:, None]
    assert sorted(map(tuple, torch.cat([x, y], 1).tolist())) == ref
    # mean/std are the (population) statistics of the training split
    assert d.mean[0] == pytest.approx(d.train_images.double().mean().item(), abs=1e-9)
    assert d.std[0] == pytest.approx(d.train_images.double().std(unbiased=False).item(), abs=1e-9)
    # fixed split: a second load gives the identical split
    assert torch.equal(get_dataset("digits").train_labels, d.train_labels)


# -------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    if not any(Path(p).is_dir() for p in ds.FASHION_MNIST_SYSTEM_DIRS):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    return get_dataset("fashion_mnist", root="/nonexistent-lightning-distill-root")


def test_fashion_mnist_from_debian_package(fashion):
    assert fashion.source == ds.FASHION_MNIST_SYSTEM_DIRS[0]
    assert fashion.train_data.shape == (60000, 1, 28, 28)
    assert fashion.test_data.shape == (10000, 1, 28, 28)
    assert fashion.num_classes == 10 and fashion.class_names[9] == "Ankle boot"
    assert fashion.train_labels.bincount().tolist() == [6000] * 10
    assert fashion.test_labels.bincount().tolist() == [1000] * 10
    assert (fashion.mean, fashion.std) == ((0.2861,), (0.3530,))  # docs/method.md (normalisation)
    x = fashion.images("train", torch.arange(0, 60000, 7))
    assert x.mean().item() == pytest.approx(0.2861, abs=2e-3)
    assert x.std().item() == pytest.approx(0.3530, abs=2e-3)


def test_fashion_mnist_missing_names_paths_and_debian_package(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-fashion"
    monkeypatch.setattr(ds.loaders, "FASHION_MNIST_SYSTEM_DIRS", (str(system),))
    with pytest.raises(FileNotFoundError) as e:
        get_dataset("fashion_mnist", root=tmp_path / "data")
    msg = str(e.value)
    for p in (tmp_path / "data", tmp_path / "data" / "FashionMNIST" / "raw", system):
        assert f"{p}  (needs" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "root=" in msg


# --------------------------------------------------------------------------- idx / MNIST


def _mnist_arrays(n_train=12, n_test=5):
    return (
        formats.random_images(n_train, (28, 28), seed=1),
        np.arange(n_train, dtype=np.uint8) % 10,
        formats.random_images(n_test, (28, 28), seed=2),
        (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    )


@pytest.mark.parametrize(("sub", "gz"), [("MNIST/raw", True), ("", False)])
def test_mnist_idx_round_trip(tmp_path, sub, gz):
    xtr, ytr, xte, yte = _mnist_arrays()
    formats.write_mnist(tmp_path / sub, xtr, ytr, xte, yte, gz=gz)
    d = get_dataset("mnist", root=tmp_path)
    assert d.source == str(tmp_path / sub)
    assert torch.equal(d.train_data, torch.from_numpy(xtr)[:, None])
    assert torch.equal(d.test_data, torch.from_numpy(xte)[:, None])
    assert torch.equal(d.train_images, torch.from_numpy(xtr)[:, None].float() / 255)
    assert d.train_labels.tolist() == ytr.tolist() and d.test_labels.tolist() == yte.tolist()
    assert (d.channels, d.image_size, d.num_classes) == (1, (28, 28), 10)
    assert (d.mean, d.std) == ((0.1307,), (0.3081,))


def test_read_idx_header_and_errors(tmp_path):
    a = formats.random_images(3, (4, 5), seed=0)
    p = formats.write_idx(tmp_path / "a-idx3-ubyte", a, gz=False)
    assert np.array_equal(read_idx(p), a)
    # truncated data
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(formats.idx_bytes(a)[:-7])
    with pytest.raises(DatasetFormatError, match=f"{bad}: truncated or corrupt idx file"):
        read_idx(bad)
    # truncated gzip stream
    gzbad = tmp_path / "t10k-images-idx3-ubyte.gz"
    gzbad.write_bytes(gzip.compress(formats.idx_bytes(a))[:-20])
    with pytest.raises(DatasetFormatError, match=f"{gzbad}: corrupt or truncated gzip"):
        read_idx(gzbad)
    # wrong magic number
    magic = tmp_path / "x-idx1-ubyte"
    magic.write_bytes(b"\x00\x01\x08\x01" + bytes(8))
    with pytest.raises(DatasetFormatError, match=f"{magic}: not an idx file"):
        read_idx(magic)


def test_truncated_file_inside_mnist_names_it(tmp_path):
    files = formats.write_mnist(tmp_path, *_mnist_arrays(), gz=True)
    p = files["train_labels"]
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-2]))
    with pytest.raises(DatasetFormatError, match=str(p)):
        get_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------- CIFAR


def test_cifar10_batches_round_trip(tmp_path):
    xtr = formats.random_images(10, (3, 32, 32), seed=3)
    ytr = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    xte = formats.random_images(4, (3, 32, 32), seed=4)
    yte = np.array([0, 9, 8, 7])
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    d_dir = formats.write_cifar10(tmp_path, xtr, ytr, xte, yte, names)
    d = get_dataset("cifar10", root=tmp_path)
    assert d.source == str(d_dir)
    assert torch.equal(d.train_data, torch.from_numpy(xtr))
    assert torch.equal(d.test_data, torch.from_numpy(xte))
    assert d.train_labels.tolist() == ytr.tolist() and d.test_labels.tolist() == yte.tolist()
    # a row of 3072 is the R plane, then G, then B, each row-major 32x32
    import pickle

    raw = (d_dir / "data_batch_1").read_bytes()  # a Python 2 pickle, as distributed
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw
    row = pickle.loads(raw, encoding="bytes")[b"data"][1]
    assert d.train_data[1, 2, 5, 7].item() == row[2 * 1024 + 5 * 32 + 7]
    assert torch.equal(d.train_images[1], torch.from_numpy(xtr[1]).float() / 255)
    assert d.class_names == tuple(names) and d.num_classes == 10
    assert (d.channels, d.image_size) == (3, (32, 32))
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2023, 0.1994, 0.2010)


def test_cifar10_missing_lists_paths_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'cifar-10-batches-py'}  (needs data_batch_1" in msg
    assert f"{tmp_path}  (needs" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "download=True" in msg


def test_cifar_rejects_pickled_code(tmp_path):
    import os
    import pickle

    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "train").write_bytes(pickle.dumps(os.system, protocol=2))
    (d / "test").write_bytes(pickle.dumps({}, protocol=2))
    with pytest.raises(DatasetFormatError, match="refusing to load"):
        get_dataset("cifar100", root=tmp_path)


@pytest.mark.parametrize("coarse", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, coarse):
    xtr = formats.random_images(6, (3, 32, 32), seed=5)
    fine, crs = np.array([0, 99, 42, 7, 99, 3]), np.array([0, 19, 8, 1, 19, 4])
    xte = formats.random_images(2, (3, 32, 32), seed=6)
    tfine, tcrs = np.array([5, 6]), np.array([2, 3])
    formats.write_cifar100(tmp_path, xtr, fine, crs, xte, tfine, tcrs)
    d = get_dataset("cifar100", root=tmp_path, coarse=coarse)
    assert torch.equal(d.train_data, torch.from_numpy(xtr))
    assert torch.equal(d.test_data, torch.from_numpy(xte))
    assert d.train_labels.tolist() == (crs if coarse else fine).tolist()
    assert d.test_labels.tolist() == (tcrs if coarse else tfine).tolist()
    assert d.num_classes == (20 if coarse else 100)
    assert d.class_names[7] == ("coarse7" if coarse else "fine7")
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2023, 0.1994, 0.2010)


# ----------------------------------------------------------------------------- SVHN


def test_svhn_mat_round_trip_and_label_10_is_zero(tmp_path):
    xtr = formats.random_images(5, (3, 32, 32), seed=7)
    ytr = np.array([0, 1, 9, 0, 5])
    xte = formats.random_images(3, (3, 32, 32), seed=8)
    yte = np.array([2, 0, 3])
    formats.write_svhn(tmp_path, "train", xtr, ytr)
    formats.write_svhn(tmp_path, "test", xte, yte)
    import scipy.io

    mat = scipy.io.loadmat(str(tmp_path / "train_32x32.mat"))
    assert mat["X"].shape == (32, 32, 3, 5) and mat["y"][:, 0].tolist() == [10, 1, 9, 10, 5]
    d = get_dataset("svhn", root=tmp_path)
    assert torch.equal(d.train_data, torch.from_numpy(xtr))
    assert d.train_data[4, 1, 3, 30].item() == mat["X"][3, 30, 1, 4]
    assert torch.equal(d.test_data, torch.from_numpy(xte))
    assert d.train_labels.tolist() == [0, 1, 9, 0, 5] and d.test_labels.tolist() == [2, 0, 3]
    assert d.num_classes == 10 and (d.channels, d.image_size) == (3, (32, 32))
    assert d.mean == (0.4377, 0.4438, 0.4728) and d.std == (0.1980, 0.2010, 0.1970)
    # extra split appended to train
    formats.write_svhn(tmp_path, "extra", xte[:1], yte[:1])
    e = get_dataset("svhn", root=tmp_path, extra=True)
    assert e.train_labels.tolist() == [0, 1, 9, 0, 5, 2]


def test_svhn_missing(tmp_path):
    formats.write_svhn(tmp_path, "train", formats.random_images(1, (3, 32, 32), 0), [1])
    with pytest.raises(FileNotFoundError, match=r"(?s)needs train_32x32.mat, test_32x32.mat.*"):
        get_dataset("svhn", root=tmp_path)


# --------------------------------------------------------------------- TinyImageNet


@pytest.fixture
def tiny_root(tmp_path):
    wnids = ["n02000002", "n01000001", "n03000003"]  # wnids.txt is not sorted
    rng = np.random.default_rng(9)

    def img(gray=False):
        shape = (64, 64) if gray else (64, 64, 3)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    train = {w: [img(), img()] for w in wnids}
    train["n03000003"].append(img(gray=True))
    val = [(img(), "n03000003"), (img(), "n01000001"), (img(gray=True), "n02000002")]
    d = formats.write_tiny_imagenet(tmp_path, wnids, train, val)
    return tmp_path, d


def test_tiny_imagenet_official_layout(tiny_root):
    root, d = tiny_root
    t = get_dataset("tiny_imagenet", root=root)
    assert t.source == str(d)
    # classes are the sorted wnids, named by words.txt
    assert t.class_names == tuple(
        f"name of {w}, alias {w}" for w in ["n01000001", "n02000002", "n03000003"]
    )
    assert t.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    order = [("n01000001", i) for i in range(2)] + [("n02000002", i) for i in range(2)]
    order += [("n03000003", i) for i in range(3)]
    expect = np.stack(
        [formats.decode(d / "train" / w / "images" / f"{w}_{i}.JPEG") for w, i in order]
    )
    assert torch.equal(t.train_data, torch.from_numpy(expect))
    assert t.train_data.shape == (7, 3, 64, 64)
    # grayscale JPEG -> 3 equal channels
    assert torch.equal(t.train_data[6, 0], t.train_data[6, 1])
    # test split = val with labels from val_annotations.txt
    assert t.test_labels.tolist() == [2, 0, 1]
    expect = np.stack([formats.decode(d / "val" / "images" / f"val_{i}.JPEG") for i in range(3)])
    assert torch.equal(t.test_data, torch.from_numpy(expect))
    assert t.mean == (0.485, 0.456, 0.406) and t.std == (0.229, 0.224, 0.225)
    assert (t.channels, t.image_size, t.num_classes) == (3, (64, 64), 3)


def test_tiny_imagenet_resize_and_missing(tiny_root, tmp_path):
    root, _ = tiny_root
    assert get_dataset("tiny_imagenet", root=root, image_size=32).image_size == (32, 32)
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as e:
        get_dataset("tiny_imagenet", root=empty)
    assert str(empty / "tiny-imagenet-200") in str(e.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(e.value)


# --------------------------------------------------------------------- image folder


def _folder_images(n_per_class, seed, size=(6, 5)):
    rng = np.random.default_rng(seed)
    return {
        c: [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(n)]
        for c, n in n_per_class.items()
    }


def test_image_folder_train_test_layout_round_trip(tmp_path):
    tr = _folder_images({"cat": 2, "ant": 3}, seed=10)
    te = _folder_images({"cat": 1, "ant": 1}, seed=11)
    formats.write_image_folder(tmp_path / "train", tr)
    formats.write_image_folder(tmp_path / "test", te)
    d = get_dataset("image_folder", root=tmp_path)
    assert d.class_names == ("ant", "cat")  # sorted folder names
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1] and d.test_labels.tolist() == [0, 1]
    expect = np.stack([a.transpose(2, 0, 1) for a in tr["ant"] + tr["cat"]])
    assert torch.equal(d.train_data, torch.from_numpy(expect))  # PNG is lossless
    assert torch.equal(d.test_data[1], torch.from_numpy(te["cat"][0].transpose(2, 0, 1)))
    assert (d.channels, d.image_size) == (3, (6, 5))
    x = expect.astype(np.float64) / 255
    assert d.mean == pytest.approx(tuple(x.mean(axis=(0, 2, 3))), abs=1e-12)
    assert d.std == pytest.approx(tuple(x.std(axis=(0, 2, 3))), abs=1e-12)


def test_image_folder_flat_layout_split_gray_and_resize(tmp_path):
    paths = formats.write_image_folder(tmp_path, _folder_images({"a": 5, "b": 10}, seed=12))
    d = get_dataset("image_folder", root=tmp_path, test_fraction=0.2, split_seed=3)
    assert d.test_labels.bincount().tolist() == [1, 2] and d.train_labels.bincount().tolist() == [
        4,
        8,
    ]
    same = get_dataset("image_folder", root=tmp_path, test_fraction=0.2, split_seed=3)
    assert torch.equal(same.test_data, d.test_data)
    g = get_dataset(
        "image_folder", root=tmp_path, channels=1, image_size=(4, 3), dataset_name="mine"
    )
    assert g.name == "mine" and g.train_data.shape[1:] == (1, 4, 3)
    gray = get_dataset("image_folder", root=tmp_path, channels=1, test_fraction=0.0)
    expect = np.stack([formats.decode(p, "L") for p in paths["a"] + paths["b"]])
    assert torch.equal(gray.train_data, torch.from_numpy(expect))


def test_image_folder_missing_and_size_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        get_dataset("image_folder", root=tmp_path / "none")
    imgs = _folder_images({"a": 1}, seed=0)
    imgs["a"].append(np.zeros((7, 7, 3), dtype=np.uint8))
    formats.write_image_folder(tmp_path / "mixed", imgs)
    with pytest.raises(DatasetFormatError, match="001.png.*pass image_size="):
        get_dataset("image_folder", root=tmp_path / "mixed")


# ------------------------------------------------------- splits and per-class access


def _toy(n_per_class=(10, 7, 3)):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    x = labels.view(-1, 1, 1, 1) * 20 + torch.arange(labels.numel()).view(-1, 1, 1, 1) % 7
    x = x.expand(-1, 3, 2, 2).to(torch.uint8).contiguous()
    return RealDataset(
        "toy", x, labels, x[:2], labels[:2], (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), "abc"
    )


def test_split_validation_stratified_disjoint_covering_seeded():
    d = _toy()
    tr, va = d.split_validation(0.3, seed=5)
    assert va.numel() + tr.numel() == len(d)
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(len(d)))
    assert d.train_labels[va].bincount(minlength=3).tolist() == [3, 2, 1]  # round(0.3 * n_c)
    tr2, va2 = d.split_validation(0.3, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, d.split_validation(0.3, seed=6)[1])
    assert d.split_validation(0.0, seed=0)[1].numel() == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        d.split_validation(1.0, seed=0)
    # every class keeps at least one training image
    _, va = stratified_split(torch.tensor([0, 1, 1]), 0.9, seed=0)
    assert va.tolist() == [1] or va.tolist() == [2]


def test_per_class_access():
    d = _toy()
    idx = d.indices_of_class(1)
    assert idx.tolist() == torch.nonzero(d.train_labels == 1).flatten().tolist()
    x = d.images_of_class(2)
    assert x.shape == (3, 3, 2, 2) and torch.equal(x, d.train_images[d.train_labels == 2])
    g = torch.Generator().manual_seed(1)
    y = d.images_of_class(0, n=4, generator=g)
    assert y.shape == (4, 3, 2, 2)
    # all from class 0 (pixel value = 20 * class + something < 7), distinct indices
    assert bool(((y * 255).round() < 20).all())
    g = torch.Generator().manual_seed(1)
    pick = d.indices_of_class(0)[torch.randperm(10, generator=g)[:4]]
    assert torch.equal(y, d.train_images[pick])
    assert d.indices_of_class(1, split="test").tolist() == [
        i for i in range(2) if d.test_labels[i] == 1
    ]
    with pytest.raises(ValueError, match="only 3"):
        d.images_of_class(2, n=4)
    with pytest.raises(ValueError, match="out of range"):
        d.indices_of_class(3)


def test_normalize_denormalize_hand_values():
    d = _toy()
    x = torch.full((1, 3, 1, 1), 0.9)
    z = d.normalize(x)
    assert z.flatten().tolist() == pytest.approx([(0.9 - 0.5) / 0.25, (0.9 - 0.4) / 0.2, 6.0])
    assert torch.allclose(d.denormalize(z), x, atol=1e-7)


def test_real_dataset_validates_fields():
    x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one value per channel"):
        RealDataset("bad", x, y, x, y, (0.5,), (0.5,), "ab")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        RealDataset("bad", x, torch.tensor([0, 2]), x, y, (0.5,) * 3, (0.5,) * 3, "ab")
    with pytest.raises(ValueError, match="uint8"):
        RealDataset("bad", x.float(), y, x, y, (0.5,) * 3, (0.5,) * 3, "ab")
