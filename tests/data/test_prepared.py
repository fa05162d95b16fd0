"""Prepared splits (memory-mapped uint8, written once) and streamed splits: the same
images, batches and orders as the in-memory path, an interrupted preparation that
resumes, and the refusals of a directory that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.datasets import get_dataset
from lightning_distill.data.datasets.sources import DatasetSource, SplitSource, get_source
from lightning_distill.data.prepared import (
    PreparedDataError,
    open_prepared,
    prepare,
    prepared_dir,
)
from lightning_distill.data.splits import HeldSplit, StreamedSplit, images_view
from lightning_distill.errors import DataFormatError, LightningDistillError, MissingFileError


def digits_source() -> DatasetSource:
    return get_source("digits")


def test_prepared_digits_equal_the_in_memory_data_set(tmp_path):
    real = get_dataset("digits")
    directory = prepare(digits_source(), tmp_path, chunk_rows=100)
    assert directory == prepared_dir(tmp_path, digits_source())
    mapped = open_prepared(directory, verify=True)
    for split in ("train", "test"):
        assert torch.equal(getattr(mapped, f"{split}_data")[:], getattr(real, f"{split}_data"))
        assert torch.equal(getattr(mapped, f"{split}_labels"), getattr(real, f"{split}_labels"))
    assert mapped.class_names == real.class_names and mapped.pixel_scale == 16.0
    assert mapped.mean == real.mean and mapped.std == real.std  # the loader's constants
    for c in range(10):  # the class index gives each class's rows
        assert torch.equal(mapped.indices_of_class(c), real.indices_of_class(c))
        assert torch.equal(mapped.indices_of_class(c, "test"), real.indices_of_class(c, "test"))
    head = json.loads((directory / "header.json").read_text())
    assert head["format"] == "lightning_distill.PreparedData" and head["format_version"] == 1
    assert head["splits"]["train"]["class_offsets"][-1] == len(real)
    assert not directory.with_name(directory.name + ".partial").exists()
    # a second call finds it ready and writes nothing
    mtime = (directory / "train_images.u8").stat().st_mtime_ns
    assert prepare(digits_source(), tmp_path) == directory
    assert (directory / "train_images.u8").stat().st_mtime_ns == mtime


def _source_without_constants(source: DatasetSource) -> DatasetSource:
    source.mean = source.std = None
    return source


def test_mean_and_std_measured_in_chunks_equal_the_whole_splits(tmp_path):
    """Without published constants the preparation measures them on the training split,
    from exact integer sums over its chunks."""
    real = get_dataset("digits")
    x = real.train_data.double() / 16.0
    directory = prepare(_source_without_constants(digits_source()), tmp_path, chunk_rows=77)
    mapped = open_prepared(directory)
    assert mapped.mean[0] == pytest.approx(float(x.mean()), rel=1e-12)
    assert mapped.std[0] == pytest.approx(float(x.std(unbiased=False)), rel=1e-12)


class Interrupt(Exception):
    pass


def _failing(source: DatasetSource, after_rows: int) -> DatasetSource:
    """``source`` whose training split raises once a read reaches ``after_rows``."""
    read = source.train.read

    def bad(start: int, stop: int):
        if stop > after_rows:
            raise Interrupt
        return read(start, stop)

    source.train = SplitSource(source.train.count, source.train.image_shape, bad,
                               source.train.files, source.train.labels)
    return source


def test_an_interrupted_preparation_is_never_used_and_resumes_at_its_last_chunk(tmp_path):
    with pytest.raises(Interrupt):
        prepare(_failing(digits_source(), 500), tmp_path, chunk_rows=100)
    final = prepared_dir(tmp_path, digits_source())
    partial = final.with_name(final.name + ".partial")
    assert not final.exists() and partial.is_dir()
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["done"] == {"train": 500, "test": 0}
    with pytest.raises(MissingFileError, match="unfinished preparation"):
        open_prepared(final)
    # resumed: the first 500 rows are not read again
    reads: list[tuple[int, int]] = []
    source = digits_source()
    read = source.train.read
    source.train.read = lambda a, b: reads.append((a, b)) or read(a, b)
    prepare(source, tmp_path, chunk_rows=100)
    assert reads[0] == (500, 600)
    assert torch.equal(open_prepared(final, verify=True).train_data[:],
                       get_dataset("digits").train_data)


def test_a_preparation_begun_for_other_files_starts_over(tmp_path):
    with pytest.raises(Interrupt):
        prepare(_failing(digits_source(), 300), tmp_path, chunk_rows=100)
    source = digits_source()
    source.train.files = ["/elsewhere/other.npz"]
    reads: list[int] = []
    read = source.train.read
    source.train.read = lambda a, b: reads.append(a) or read(a, b)
    prepare(source, tmp_path, chunk_rows=100)
    assert reads[0] == 0


def test_refusals_of_a_prepared_directory(tmp_path):
    directory = prepare(digits_source(), tmp_path)
    other = digits_source()
    other.settings = {"image_size": 16}
    with pytest.raises(PreparedDataError, match="prepared for") as e:
        open_prepared(directory, expect=other)
    assert "header.json" in str(e.value) and "\n" not in str(e.value)
    # a newer format
    head = json.loads((directory / "header.json").read_text())
    (directory / "header.json").write_text(json.dumps({**head, "format_version": 99}))
    with pytest.raises(DataFormatError, match="newer"):
        open_prepared(directory)
    (directory / "header.json").write_text(json.dumps(head))
    # altered bytes: caught by verify
    images = directory / "train_images.u8"
    raw = bytearray(images.read_bytes())
    raw[5] ^= 1
    images.write_bytes(bytes(raw))
    open_prepared(directory)  # sizes still fit
    with pytest.raises(PreparedDataError, match="SHA-256"):
        open_prepared(directory, verify=True)
    # truncated
    images.write_bytes(bytes(raw[:-10]))
    with pytest.raises(PreparedDataError, match="train_images.u8.*expected") as e:
        open_prepared(directory)
    assert isinstance(e.value, LightningDistillError) and "\n" not in str(e.value)


def test_bad_rows_from_a_source_are_refused_naming_the_source(tmp_path):
    source = digits_source()
    read = source.train.read
    source.source = "/data/digits-files"
    source.train.read = lambda a, b: (read(a, b)[0], read(a, b)[1] + 10)
    with pytest.raises(DataFormatError, match="/data/digits-files: labels of rows 0"):
        prepare(source, tmp_path)
    assert not prepared_dir(tmp_path, source).exists()


# ------------------------------------------------------------------- streamed splits

def _modules(tmp_path, **kw):
    held = RealDataModule("digits", batch_size=64, hold=True, **kw)
    streamed = RealDataModule("digits", batch_size=64, hold=False, prepared=True,
                              prepared_root=tmp_path, **kw)
    held.setup()
    streamed.prepare_data()
    streamed.setup()
    return held, streamed


@pytest.mark.parametrize("zca", [False, True], ids=["meanstd", "zca"])
def test_streamed_batches_equal_held_batches_bit_for_bit(tmp_path, zca):
    held, streamed = _modules(tmp_path, zca=zca)
    assert isinstance(held.train_set, HeldSplit) and isinstance(streamed.train_set, StreamedSplit)
    with pytest.raises(LightningDistillError, match="streamed"):
        _ = streamed.train_set.tensors
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        a_batches = list(getattr(held, name)())
        b_batches = list(getattr(streamed, name)())
        assert len(a_batches) == len(b_batches) > 0
        for a, b in zip(a_batches, b_batches, strict=True):
            assert b[0].dtype == torch.uint8  # codes until the transfer hook
            x, y = streamed.on_after_batch_transfer(b, 0)
            assert torch.equal(x, a[0]) and torch.equal(y, a[1])
    assert streamed.train_set.rows_read == len(streamed.train_set)  # one epoch read once
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(held.images_of_class(4, 6, g[0]), streamed.images_of_class(4, 6, g[1]))
    idx = torch.tensor([5, 0, 77])
    assert torch.equal(images_view(streamed.train_set)[idx], held.train_set.tensors[0][idx])
    assert streamed.input_space == held.input_space


def test_streamed_member_batches_and_a_dataloader_with_workers(tmp_path):
    held, streamed = _modules(tmp_path)
    for a, b in zip(held.member_train_dataloader([1, 2]),
                    streamed.member_train_dataloader([1, 2]), strict=True):
        x, y = streamed.on_after_batch_transfer(b, 0)
        assert x.shape[:2] == (2, a[0].shape[1]) and torch.equal(x, a[0])
        assert torch.equal(y, a[1])
    streamed.loader, streamed.num_workers = "dataloader", 1
    held.loader = "dataloader"
    for a, b in zip(held.train_dataloader(), streamed.train_dataloader(), strict=True):
        x, y = streamed.on_after_batch_transfer(b, 0)
        assert torch.equal(x, a[0]) and torch.equal(y, a[1])


def test_the_hold_rule_and_a_streamed_zca_fit_on_a_stated_number(tmp_path, monkeypatch):
    import lightning_distill.data.datamodule as datamodule

    dm = RealDataModule("digits")
    dm.setup()
    assert isinstance(dm.train_set, HeldSplit)
    # a limit below the training part's float32 bytes (1078 x 64 x 4) streams it
    monkeypatch.setattr(datamodule, "HOLD_LIMIT_BYTES", 1078 * 64 * 4 - 1)
    monkeypatch.setattr(datamodule, "ZCA_STREAMED_FIT_IMAGES", 500)
    dm = RealDataModule("digits", zca=True)
    dm.setup()
    assert isinstance(dm.train_set, StreamedSplit) and isinstance(dm.test_set, HeldSplit)
    assert dm.zca._num_samples == 500
    assert RealDataModule("digits", zca=True, zca_fit_images=100, hold=True)._holds(10**9)


@pytest.mark.filterwarnings("ignore:samples_predicted_correctly")
@pytest.mark.filterwarnings("ignore:soft label init")
def test_distillation_initialises_from_a_streamed_split_as_from_a_held_one(tmp_path):
    from tests.helpers import build_digits_store, make_distill_module

    held, streamed = _modules(tmp_path)
    store = build_digits_store(tmp_path / "store")
    sets = []
    for dm in (held, streamed):
        module = make_distill_module(store, ipc=2, image_init="samples_predicted_correctly",
                                     label_init="soft", learn_labels=True)
        module.initialize(dm)
        sets.append((module.images.detach().clone(), module.labels.detach().clone()))
    assert torch.equal(sets[0][0], sets[1][0]) and torch.equal(sets[0][1], sets[1][1])
    assert streamed.train_set.rows_read > 0  # read by rows, through the split


def test_row_file_reads_rows_in_any_order_with_repeats(tmp_path):
    """A prepared split's images are read by positioned reads: rows in any order, runs,
    repeats (a DDP shard padded by wrapping), negative rows, slices; out of range refused."""
    from lightning_distill.data.prepared import RowFile

    real = get_dataset("digits")
    mapped = open_prepared(prepare(digits_source(), tmp_path))
    rows = mapped.train_data
    assert isinstance(rows, RowFile) and rows.shape == real.train_data.shape
    assert rows.dtype == torch.uint8 and rows.dim() == 4 and len(rows) == len(real)
    idx = torch.tensor([7, 3, 4, 5, 5, 1197, 0, 8, 6, -1])
    assert torch.equal(rows.index_select(0, idx), real.train_data[idx])
    assert torch.equal(rows[10:20], real.train_data[10:20])
    assert torch.equal(rows[3], real.train_data[3])
    assert torch.equal(rows[torch.zeros(0, dtype=torch.long)], real.train_data[:0])
    with pytest.raises(LightningDistillError, match="rows must lie"):
        rows.index_select(0, torch.tensor([1198]))
    assert torch.equal(mapped.images("train", idx), real.images("train", idx))


def test_source_of_a_registered_loader_reads_row_ranges():
    source = digits_source()
    real = get_dataset("digits")
    codes, labels = source.train.read(10, 20)
    assert np.array_equal(codes, real.train_data[10:20].numpy())
    assert np.array_equal(labels, real.train_labels[10:20].numpy())
    assert source.train.count == len(real) and source.test.count == real.test_data.shape[0]


def test_the_prepare_subcommand(tmp_path, capsys):
    from lightning_distill import cli

    root = tmp_path / "prepared"
    assert cli.main(["prepare", "--data.name", "digits", "--data.prepared_root", str(root)]) == 0
    (directory,) = root.iterdir()
    assert (directory / "header.json").is_file()
    assert cli.main(["prepare", "--data.name", "digits", "--data.prepared_root", str(root),
                     "--verify", "true"]) == 0
    assert "SHA-256 checked" in capsys.readouterr().out
    (directory / "test_labels.i64").write_bytes(b"")
    assert cli.main(["prepare", "--data.name", "digits", "--data.prepared_root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "test_labels.i64" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", ["train_test", "one_folder"])
def test_an_image_folder_prepared_in_chunks_equals_the_in_memory_folder(tmp_path, layout):
    """``image_folder`` as a source: the same classes, splits and pixels as the in-memory
    loader, read a few files at a time; its mean / std measured on the training split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 7), ("test", 3)):
        for c in ("cat", "dog", "emu"):
            d = root / split / c if layout == "train_test" else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (12 + i, 9 + 2 * i)  # various sizes: resized to 8x8
                a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{split}_{i}.png")
    kw = {"image_size": 8, "test_fraction": 0.3}
    real = get_dataset("image_folder", root, **kw)
    directory = prepare(get_source("image_folder", root, **kw), tmp_path / "prep", chunk_rows=4)
    mapped = open_prepared(directory)
    assert mapped.class_names == real.class_names == ("cat", "dog", "emu")
    for split in ("train", "test"):
        assert torch.equal(getattr(mapped, f"{split}_data")[:], getattr(real, f"{split}_data"))
        assert torch.equal(getattr(mapped, f"{split}_labels"), getattr(real, f"{split}_labels"))
    assert mapped.mean == pytest.approx(real.mean, rel=1e-12)
    assert mapped.std == pytest.approx(real.std, rel=1e-12)


# ------------------------------------------------------------------ one at a time

def _lock_of(tmp_path):
    final = prepared_dir(tmp_path, digits_source())
    return final, final.with_name(final.name + ".lock")


def test_a_lock_left_by_an_ended_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True).stdout.strip()
    final, lock = _lock_of(tmp_path)
    lock.write_text(f"{socket.gethostname()} {ended} abc")  # a preparation that was killed
    said: list[str] = []
    assert prepare(digits_source(), tmp_path, log=said.append) == final
    assert any("taking over" in s and "ended" in s for s in said)
    assert (final / "header.json").is_file() and not lock.exists()


def test_a_second_preparation_waits_for_the_first_and_uses_its_directory(tmp_path,
                                                                         monkeypatch):
    """Two nodes on one shared filesystem: the one that finds the lock held waits, writes
    nothing, and returns the directory the holder completes."""
    import threading
    import time

    import lightning_distill.data.prepared as prepared

    monkeypatch.setattr(prepared, "LOCK_POLL_SECONDS", 0.02)
    final, lock = _lock_of(tmp_path)
    lock.write_text("another-node 12345 abc")  # alive elsewhere, touched just now
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(prepare(digits_source(), tmp_path)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not final.exists()
    assert not final.with_name(final.name + ".partial").exists()  # it wrote nothing
    done = prepare(digits_source(), tmp_path / "elsewhere")  # "the other node" finishes
    done.rename(final)
    lock.unlink()
    waiter.join(timeout=10)
    assert result == [final]
    assert torch.equal(open_prepared(final).train_data[:], get_dataset("digits").train_data)


def test_a_lock_untouched_for_too_long_is_taken_over(tmp_path, monkeypatch):
    import lightning_distill.data.prepared as prepared

    monkeypatch.setattr(prepared, "LOCK_POLL_SECONDS", 0.02)
    monkeypatch.setattr(prepared, "LOCK_STALE_SECONDS", 0.2)
    final, lock = _lock_of(tmp_path)
    lock.write_text("another-node 12345 abc")
    said: list[str] = []
    assert prepare(digits_source(), tmp_path, log=said.append) == final
    assert any("untouched" in s for s in said)  # (waiting first: the test above)
    assert not lock.exists()
