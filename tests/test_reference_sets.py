"""The reference scripts' synthetic sets (issue 30): files written exactly as the distill
scripts of DATM / PAD (``Normal/images_<tag>.pt``, ``labels_<tag>.pt`` soft logits,
``lr_<tag>.pt`` a 0-dim tensor, tensors that still require grad) and MTT
(``images_<tag>.pt``, ``labels_<tag>.pt`` hard class ids, no step size) import as
SyntheticSets that evaluate exactly like the same tensors built by hand; export then
import gives the same set bit for bit; bad input is one line naming the file, and
nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_distill import cli
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.reference_sets import hard_labels, read_reference, reference_tags
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.errors import DataFormatError, InputError, MissingFileError
from lightning_distill.modules.evaluate import evaluate_synthetic
from tests.data import formats
from tests.helpers import random_digits_set

EVAL = dict(models=["ConvNet"], runs=2, seed=3, epochs=3, batch_size=16, group_size=1,
            model_kwargs={"ConvNet": {"width": 8, "depth": 2}})


def write_datm(run_dir: Path, images, labels, lr: float, tag: str = "best") -> Path:
    """What DATM's / PAD's distill script saves: ``torch.save(image_syn.cpu(), ...)`` of
    tensors being optimised (they require grad), ``syn_lr.detach().cpu()`` (0-dim
    float32), into ``<run>/Normal``."""
    d = run_dir / "Normal"
    d.mkdir(parents=True, exist_ok=True)
    image_syn = images.detach().clone().requires_grad_(True)
    label_syn = labels.detach().clone()
    if label_syn.is_floating_point():
        label_syn.requires_grad_(True)
    syn_lr = torch.tensor(lr).requires_grad_(True)
    torch.save(image_syn.cpu(), d / f"images_{tag}.pt")
    torch.save(label_syn.cpu(), d / f"labels_{tag}.pt")
    torch.save(syn_lr.detach().cpu(), d / f"lr_{tag}.pt")
    return d


def write_mtt(run_dir: Path, images, labels, tag: str = "best") -> Path:
    """What MTT's distill script saves: images and hard labels, no step size."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(images.detach().clone().requires_grad_(True).cpu(), run_dir / f"images_{tag}.pt")
    torch.save(labels.long().cpu(), run_dir / f"labels_{tag}.pt")
    return run_dir


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """CIFAR-10 on-disk batches: 12 training and 3 test images per class, with a little
    class signal (a per-class brightness)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    ytr, yte = np.repeat(np.arange(10), 12), np.repeat(np.arange(10), 3)

    def images(y):
        base = rng.integers(0, 160, size=(y.size, 3, 32, 32))
        return (base + 9 * y[:, None, None, None]).astype(np.uint8)

    formats.write_cifar10(root, images(ytr), ytr, images(yte), yte)
    return root


@pytest.fixture(scope="module")
def cifar_zca(cifar_root) -> RealDataModule:
    dm = RealDataModule("cifar10", root=cifar_root, zca=True)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def digits() -> RealDataModule:
    dm = RealDataModule("digits")
    dm.setup("fit")
    return dm


def evaluation(syn, dm):
    x, y = dm.test_set.tensors
    return evaluate_synthetic(syn, x, y, input_space=dm.input_space, **EVAL)


def zca_soft_set(dm, ipc=2, seed=0):
    """Real training images of each class in ZCA space (DATM's initialisation), moved a
    little, with soft logits."""
    g = torch.Generator().manual_seed(seed)
    x, y = dm.train_set.tensors
    idx = torch.cat([torch.nonzero(y == c).flatten()[:ipc] for c in range(10)])
    images = x[idx] + 0.01 * torch.randn(x[idx].shape, generator=g)
    logits = torch.randn(idx.numel(), 10, generator=g) + 3 * torch.nn.functional.one_hot(y[idx], 10)
    return images, logits


# ---------------------------------------------------------------- imports
def test_datm_layout_with_zca_and_soft_labels_imports_and_evaluates_as_by_hand(cifar_zca,
                                                                              tmp_path):
    images, logits = zca_soft_set(cifar_zca)
    normal = write_datm(tmp_path / "run", images, logits, 0.0123)
    write_datm(tmp_path / "run", images + 1, logits, 0.5, tag="1000")  # another iteration
    assert reference_tags(normal) == ["best", "1000"]
    syn = SyntheticSet.from_reference(tmp_path / "run", cifar_zca)  # the run's dir: Normal/
    assert torch.equal(syn.images, images) and torch.equal(syn.labels, logits)
    assert not syn.images.requires_grad and syn.soft
    assert syn.lr == float(torch.tensor(0.0123))  # float32, as saved
    assert syn.meta["input_space"] == cifar_zca.input_space.to_dict()
    assert syn.meta["input_space"]["normalization"] == "zca"
    assert syn.meta["imported_from"] == {"directory": str(normal), "tag": "best",
                                         "files": ["images_best.pt", "labels_best.pt",
                                                   "lr_best.pt"], "lr_source": "lr_best.pt"}
    assert syn.ipc == 2 and syn.num_classes == 10
    by_hand = SyntheticSet(images.clone(), logits.clone(), float(torch.tensor(0.0123)),
                           {"dataset": "cifar10", "input_space": cifar_zca.input_space})
    assert evaluation(syn, cifar_zca) == evaluation(by_hand, cifar_zca)
    later = SyntheticSet.from_reference(normal, cifar_zca, iteration=1000, check_space=False)
    assert torch.equal(later.images, images + 1) and later.lr == 0.5


def test_mtt_layout_with_hard_labels_imports_with_the_given_or_a_saved_step_size(digits,
                                                                                 tmp_path):
    ref = random_digits_set(ipc=3, seed=1)
    run = write_mtt(tmp_path / "run", ref.images, ref.labels, tag="5000")
    with pytest.raises(InputError, match=r"no lr_5000.pt or syn_lr_5000.pt .*pass"):
        SyntheticSet.from_reference(run, digits, iteration=5000)
    syn = SyntheticSet.from_reference(run, digits, iteration="5000", lr=0.02)
    assert torch.equal(syn.images, ref.images) and torch.equal(syn.labels, ref.labels)
    assert syn.labels.dtype == torch.int64 and not syn.soft and syn.lr == 0.02
    assert syn.meta["imported_from"]["lr_source"] == "given"
    by_hand = SyntheticSet(ref.images.clone(), ref.labels.clone(), 0.02,
                           {"dataset": "digits", "input_space": digits.input_space})
    assert evaluation(syn, digits) == evaluation(by_hand, digits)
    torch.save(torch.tensor(0.03), run / "syn_lr_5000.pt")  # a fork that saved syn_lr
    saved = SyntheticSet.from_reference(run, digits, iteration=5000)
    assert saved.lr == float(torch.tensor(0.03)) and saved.meta["imported_from"]["lr_source"] \
        == "syn_lr_5000.pt"
    torch.save(0.04, run / "lr_5000.pt")  # a fork that saved syn_lr.item()
    assert SyntheticSet.from_reference(run, digits, iteration=5000).lr == 0.04


def test_hard_labels_are_class_major_for_soft_sets_as_dd_ranking_gives_them():
    logits = torch.zeros(6, 3)
    logits[0, 2] = 5.0  # a learned label that left its class
    assert hard_labels(logits).tolist() == [0, 0, 1, 1, 2, 2]
    assert hard_labels(torch.zeros(5, 3)).tolist() == [0] * 5  # not K * ipc: argmax
    assert hard_labels(torch.tensor([2, 0, 1])).tolist() == [2, 0, 1]


# ---------------------------------------------------------------- round trip
def test_export_then_import_is_the_same_set_bit_for_bit(cifar_zca, tmp_path):
    images, logits = zca_soft_set(cifar_zca, seed=4)
    syn = SyntheticSet(images, logits, 0.01234567890123,
                       {"dataset": "cifar10", "input_space": cifar_zca.input_space.to_dict(),
                        "ipc": 2, "source_store": "outputs/cifar10/experts"})
    path = syn.save(tmp_path / "set.pt", grid=False)
    loaded = SyntheticSet.load(path)
    written = loaded.to_reference(tmp_path / "datm")
    assert [p.name for p in written] == ["images_best.pt", "labels_best.pt", "lr_best.pt",
                                         "meta_best.json"]
    lr_file = torch.load(tmp_path / "datm" / "lr_best.pt", weights_only=True)
    assert lr_file.dim() == 0 and lr_file.item() == syn.lr  # what DD-Ranking's .item() reads
    back = SyntheticSet.from_reference(tmp_path / "datm", cifar_zca)
    for a, b in ((back.images, loaded.images), (back.labels, loaded.labels)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.lr == loaded.lr
    ignore = ("imported_from", "created", "path")
    assert {k: v for k, v in back.meta.items() if k not in ignore} == \
        {k: v for k, v in loaded.meta.items() if k not in ignore}
    assert evaluation(back, cifar_zca) == evaluation(loaded, cifar_zca)
    with pytest.raises(InputError, match="exist"):  # nothing overwritten unasked
        loaded.to_reference(tmp_path / "datm")


def test_export_set_writes_the_datm_layout_and_an_imagefolder_in_pixel_space(digits,
                                                                             tmp_path):
    from torchvision.datasets import ImageFolder

    syn = random_digits_set(ipc=2, seed=2)
    path = syn.save(tmp_path / "set.pt", grid=False)
    assert cli.main(["export-set", str(path), "--output", str(tmp_path / "datm")]) == 0
    assert sorted(p.name for p in (tmp_path / "datm").iterdir()) == [
        "images_best.pt", "labels_best.pt", "lr_best.pt", "meta_best.json"]
    out = tmp_path / "png"
    assert cli.main(["export-set", str(path), "--format", "imagefolder", "--output",
                     str(out)]) == 0  # mean/std: undone from the set's own input space
    folder = ImageFolder(str(out))
    assert folder.classes == [f"{c:03d}" for c in range(10)] and len(folder) == 20
    assert [t for _, t in folder.samples] == syn.labels.tolist()
    img = torch.from_numpy(np.array(folder.loader(folder.samples[0][0]))).float() / 255
    pixels = digits.from_input_space(syn.images[:1]).clamp(0, 1)[0, 0]
    assert (img[..., 0] - pixels).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding


# ---------------------------------------------------------------- bad input
def one_line(argv, capsys, *names) -> str:
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


def _digits_run(tmp_path, mutate) -> Path:
    ref = random_digits_set(ipc=2, seed=5)
    images, labels = ref.images.clone(), ref.labels.clone()
    images, labels = mutate(images, labels)
    return write_datm(tmp_path / "run", images, labels, 0.01)


@pytest.mark.parametrize("mutate, file, words", [
    (lambda x, y: (torch.zeros(20, 3, 32, 32), y), "images_best.pt", "shape"),
    (lambda x, y: (x, torch.randn(20, 5)), "labels_best.pt", "5 classes"),
    (lambda x, y: (x.index_put((torch.tensor([3]),), torch.tensor(float("nan"))), y),
     "images_best.pt", "NaN"),
    (lambda x, y: (x, y.index_put((torch.tensor([0]),), torch.tensor(10))),
     "labels_best.pt", "out of range"),
    (lambda x, y: (x * 0.3760 + 0.306, y), "images_best.pt", "[0, 1] pixels"),
])
def test_a_bad_set_is_one_line_naming_the_file_and_nothing_is_written(
        tmp_path, capsys, mutate, file, words):
    run = _digits_run(tmp_path, mutate)
    out = tmp_path / "out" / "set.pt"
    line = one_line(["import-set", str(run), "--data.name", "digits", "--output", str(out)],
                    capsys, file, words)
    assert "import-set: error:" in line
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_missing_files_and_step_size_are_one_line(tmp_path, capsys):
    run = _digits_run(tmp_path, lambda x, y: (x, y))
    out = str(tmp_path / "set.pt")
    (run / "lr_best.pt").unlink()
    one_line(["import-set", str(run), "--data.name", "digits", "--output", out], capsys,
             "no lr_best.pt", "--lr")
    (run / "labels_best.pt").unlink()
    one_line(["import-set", str(run), "--data.name", "digits", "--output", out, "--lr",
              "0.01"], capsys, "labels_best.pt does not exist")
    one_line(["import-set", str(run), "--data.name", "digits", "--output", out,
              "--iteration", "7"], capsys, "images_7.pt does not exist", "best")
    one_line(["import-set", str(run), "--output", out], capsys, "--data.name")
    one_line(["import-set", str(run), "--data.nmae", "digits", "--output", out], capsys,
             "data.nmae", "did you mean 'data.name'")
    assert not Path(out).exists()
    with pytest.raises(MissingFileError):
        read_reference(tmp_path / "nowhere")


def test_a_zca_set_imported_as_mean_std_data_is_refused(cifar_root, cifar_zca, tmp_path,
                                                        capsys):
    images, logits = zca_soft_set(cifar_zca)
    run = write_datm(tmp_path / "run", images, logits, 0.01)
    out = tmp_path / "set.pt"
    base = ["import-set", str(run), "--data.name", "cifar10", "--data.root", str(cifar_root),
            "--output", str(out)]
    one_line(base, capsys, "images_best.pt", "look ZCA-whitened", "--data.zca true")
    assert not out.exists()
    syn = SyntheticSet.from_reference(run, cifar_zca)  # the same files as ZCA data: taken
    # a set exported with its meta names its space: another ZCA fit is refused exactly
    syn.meta["input_space"]["zca_fingerprint"] = "0" * 16
    syn.to_reference(tmp_path / "other")
    with pytest.raises(DataFormatError, match=r"meta_best.json.*zca_fingerprint"):
        SyntheticSet.from_reference(tmp_path / "other", cifar_zca)


def test_import_set_records_the_store_and_refuses_another_space(tmp_path, digits,
                                                                monkeypatch):
    from tests.helpers import DIGITS_MODEL, build_digits_store, build_tiny_store

    store = build_digits_store(tmp_path / "experts")
    run = _digits_run(tmp_path, lambda x, y: (x, y))
    out = tmp_path / "set.pt"
    assert cli.main(["import-set", str(run), "--data.name", "digits", "--output", str(out),
                     "--store", str(store)]) == 0
    syn = SyntheticSet.load(out)
    assert syn.meta["source_store"] == str(store) and syn.meta["model"]["width"] == 8
    other = build_tiny_store(tmp_path / "other", experts=1, epochs=1, model=DIGITS_MODEL).path
    monkeypatch.setenv("LIGHTNING_DISTILL_TRACEBACK", "1")
    with pytest.raises(InputError, match="experts' input space differs"):
        cli.main(["import-set", str(run), "--data.name", "digits", "--output",
                  str(tmp_path / "b.pt"), "--store", str(other)])
    assert not (tmp_path / "b.pt").exists()


def test_exporting_a_zca_set_to_pixels_needs_its_data(tmp_path, capsys):
    syn = random_digits_set(ipc=1)
    syn.meta["input_space"] = {"dataset": "digits", "normalization": "zca",
                               "zca_fingerprint": "0123456789abcdef", "zca_regularization": 0.1}
    path = syn.save(tmp_path / "zca.pt", grid=False)
    out = tmp_path / "png"
    one_line(["export-set", str(path), "--format", "imagefolder", "--output", str(out)],
             capsys, str(path), "--data.zca true")
    one_line(["export-set", str(path), "--format", "imagefolder", "--output", str(out),
              "--data.name", "digits"], capsys, "input space mismatch")
    assert not out.exists()
    one_line(["export-set", str(path), "--format", "tiff", "--output", str(out)], capsys,
             "--format", "datm")
