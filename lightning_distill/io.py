"""Atomic file writes shared by every stage (trajectory stores, synthetic sets, configs).

A file written through these helpers is either absent or complete: the data goes
to a temporary file in the target's directory (same file system), is flushed and
``fsync``-ed, then renamed over the target with :func:`os.replace`, which is atomic
on POSIX and Windows. A crash or an exception midway leaves the previous target (or
none) and removes the temporary file, so an interrupted run never leaves a partial
expert or synthetic set for a resumed run to trust (docs/formats.md).

Temporary files are named ``.<target name>.<random>.tmp`` so that directory scans
looking for ``expert_*.pt`` and the like never pick them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import InputError, MissingFileError

__all__ = [
    "atomic_open",
    "atomic_save",
    "atomic_save_new",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "is_temp_file",
]

_TMP_SUFFIX = ".tmp"


def is_temp_file(path: str | os.PathLike) -> bool:
    """True for a temporary file left by :func:`atomic_open` (e.g. after a ``kill -9``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (POSIX only; best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(target: Path) -> tuple[int, Path]:
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make the final file 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _check_parent(target: Path) -> None:
    if not target.parent.is_dir():
        raise MissingFileError(
            f"cannot write {target}: directory {target.parent} does not exist (create it first)"
        )


def _write_synced(fd: int, mode: str, write: Any, **kwargs: Any) -> None:
    """Open ``fd``, let ``write(f)`` fill it, flush and fsync it."""
    with open(fd, mode, **kwargs) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` atomically when the block exits cleanly.

    ``mode`` is ``"wb"`` or ``"w"`` (``kwargs`` go to :func:`open`, e.g. ``encoding``). The
    parent directory must exist. If the block raises, ``path`` is left untouched and
    the temporary file is deleted::

        with atomic_open("grid.png") as f:
            image.save(f, format="PNG")
    """
    if mode not in ("w", "wb"):
        raise InputError(f"atomic_open supports mode 'w' or 'wb', got {mode!r}")
    target = Path(path)
    _check_parent(target)
    fd, tmp = _create_temp(target)
    try:
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (temporary file + fsync + ``os.replace``)."""
    target = Path(path)
    with atomic_open(target, "wb") as f:
        torch.save(obj, f)
    return target


def atomic_save_new(obj: Any, path: str | os.PathLike) -> bool:
    """``torch.save(obj, path)`` only if ``path`` does not exist yet; True if this call wrote it.

    First writer wins: the data goes to a temporary file that is then hard-linked to
    ``path``, which fails when ``path`` exists, so of several processes publishing the same
    file at once (experts shards computing the same cache) exactly one succeeds and all of
    them can read back the one file. On a file system without hard links the fallback is
    "replace unless it exists" (a narrow race left open there).
    """
    target = Path(path)
    _check_parent(target)
    fd, tmp = _create_temp(target)
    try:
        _write_synced(fd, "wb", lambda f: torch.save(obj, f))
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:
            if target.exists():
                return False
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(target.parent)
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    target = Path(path)
    with atomic_open(target, "wb") as f:
        f.write(data)
    return target


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    target = Path(path)
    with atomic_open(target, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return target


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, trailing newline) atomically.

    Serialisation happens before the file is touched, so a non-serialisable ``obj``
    raises ``TypeError`` and leaves ``path`` as it was.
    """
    text = json.dumps(obj, indent=indent) + "\n"
    return atomic_write_text(path, text)
