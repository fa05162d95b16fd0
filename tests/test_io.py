"""Atomic writes: the target is either the old file, absent, or the complete new file."""

import json
import os

import pytest
import torch

from lightning_distill import io
from lightning_distill.io import (
    atomic_open,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temp_file,
)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_save_round_trip_and_overwrite(tmp_path):
    target = tmp_path / "x.pt"
    a = {"t": torch.arange(6.0).reshape(2, 3), "n": 3}
    assert atomic_save(a, target) == target
    got = torch.load(target, weights_only=True)
    assert torch.equal(got["t"], a["t"]) and got["n"] == 3
    atomic_save(torch.ones(4), target)
    assert torch.equal(torch.load(target, weights_only=True), torch.ones(4))
    assert _listing(tmp_path) == ["x.pt"]  # no temporary file left


def test_text_json_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\nworld")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\nworld"
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2.5, None], "s": "x"})
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": [1, 2.5, None], "s": "x"}
    assert (tmp_path / "b.json").read_text().endswith("\n")
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01\x02")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01\x02"
    assert _listing(tmp_path) == ["a.txt", "b.json", "c.bin"]


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_partial_target(tmp_path, monkeypatch, existing):
    target = tmp_path / "expert_00000.pt"
    if existing:
        atomic_save(torch.zeros(3), target)
    before = target.read_bytes() if existing else None

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half of a zip archive")  # some bytes reach the temp file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(torch.ones(3), target)
    if existing:
        assert target.read_bytes() == before  # the old file is untouched
        assert _listing(tmp_path) == ["expert_00000.pt"]
    else:
        assert not target.exists()
        assert _listing(tmp_path) == []  # and no temporary file remains


def test_exception_inside_atomic_open(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "f.txt", "w") as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_unserialisable_json_leaves_file_alone(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "m.json", {"a": object()})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert _listing(tmp_path) == ["m.json"]


def test_missing_directory_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_save(torch.ones(1), tmp_path / "nope" / "x.pt")
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_temp_file_naming(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", spy)
    atomic_write_text(tmp_path / "expert_00003.pt", "x")
    (src, dst), = seen
    assert dst == "expert_00003.pt"
    assert src.startswith(".expert_00003.pt.") and is_temp_file(src)
    assert not is_temp_file("expert_00003.pt")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "p.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_save_new_first_writer_wins(tmp_path, monkeypatch):
    from lightning_distill.io import atomic_save_new

    target = tmp_path / "scores.pt"
    assert atomic_save_new(torch.arange(3), target) is True
    assert atomic_save_new(torch.ones(3), target) is False  # exists: left alone
    assert torch.equal(torch.load(target, weights_only=True), torch.arange(3))
    assert _listing(tmp_path) == ["scores.pt"]  # no temporary file left
    # a file system without hard links: replace-unless-exists
    def no_link(src, dst):
        raise PermissionError("no hard links here")

    monkeypatch.setattr(io.os, "link", no_link)
    other = tmp_path / "other.pt"
    assert atomic_save_new(torch.zeros(2), other) is True
    assert atomic_save_new(torch.ones(2), other) is False
    assert torch.equal(torch.load(other, weights_only=True), torch.zeros(2))
    assert _listing(tmp_path) == ["other.pt", "scores.pt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_save_new(1, tmp_path / "missing" / "x.pt")
