"""Prepared splits: a data set written once as uint8 arrays on disk, read by rows, never held.

:func:`prepare` walks a :class:`~lightning_distill.data.datasets.sources.DatasetSource`
in chunks of rows and writes, per split, into one directory (docs/formats.md, 'Prepared
data')::

    <prepared root>/<name>-<key>/          key: 12 hex digits of the settings' hash
        header.json                        the artifact header, the settings, the classes,
                                           the normalisation, per split: count, shape,
                                           class offsets and the files' SHA-256
        train_images.u8  test_images.u8    uint8 [N, C, H, W], C-order, no header
        train_labels.i64 test_labels.i64   int64 [N] (little-endian)
        train_class_index.i64 ...          the rows sorted by class (stable): the rows of
                                           class c are index[offsets[c]:offsets[c + 1]]

Nothing half-written is ever used: the directory is built as ``<name>-<key>.partial``
and renamed into place (one atomic rename) only once every split is written, counted
and hashed. ``.partial/progress.json`` records, after each chunk is flushed to disk, how
many rows of which split are done, so an interrupted preparation resumes at its last
chunk; one begun for other settings or other source files starts over.

:func:`open_prepared` gives a :class:`~lightning_distill.data.datasets.RealDataset` whose
``train_data`` / ``test_data`` are :class:`RowFile` objects: every stage reads only the
rows it gathers, with positioned reads, and holds only those. It refuses, in one line
naming the file and what to do, a directory written by a newer format, for other
settings, or with a file of the wrong size; ``verify=True``
also re-hashes the files.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import check_header, file_sha256, header, sha256
from ..errors import DataFormatError, InputError, MissingFileError
from ..io import atomic_write_json
from .datasets.container import DatasetFormatError, RealDataset
from .datasets.sources import DatasetSource, SplitSource

__all__ = [
    "PREPARED_FORMAT",
    "PREPARED_VERSION",
    "PreparedDataError",
    "open_prepared",
    "prepare",
    "prepared_dir",
]

PREPARED_FORMAT = "lightning_distill.PreparedData"
PREPARED_VERSION = 1
#: rows per chunk aim at this many bytes of images (one chunk is read, checked, written
#: and flushed at a time: the preparation's memory is about one chunk plus the source's)
CHUNK_BYTES = 64 << 20
_SPLITS = ("train", "test")


class PreparedDataError(DataFormatError):
    """A prepared directory that cannot be used (other settings, newer format, a file of
    the wrong size or hash)."""


def _identity(source: DatasetSource) -> dict[str, Any]:
    """What decides the prepared bytes: the data set, its settings and the source files
    (the files by name, size and modification time: a replaced file starts over)."""
    files = {}
    for split in _SPLITS:
        for f in source.split(split).files:
            try:
                st = os.stat(f)
                files[f] = [st.st_size, int(st.st_mtime)]
            except OSError:
                files[f] = None
    return {"name": source.name, "settings": _jsonable(source.settings), "files": files}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def prepared_dir(root: str | os.PathLike, source: DatasetSource) -> Path:
    """``root / <name>-<key>``: the key hashes the name and settings (not the files), so a
    data set prepared with other settings (another resize, another subset) lives beside it."""
    key = sha256(json.dumps({"name": source.name, "settings": _jsonable(source.settings),
                             "format_version": PREPARED_VERSION}, sort_keys=True), length=12)
    return Path(root).expanduser() / f"{source.name}-{key}"


def _rows_per_chunk(shape: tuple[int, ...], chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise InputError(f"prepare: chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    return max(1, CHUNK_BYTES // max(1, math.prod(shape)))


def _progress_bar(enabled: bool, total: int, what: str) -> Callable[[int], None]:
    """``advance(rows)`` of a rich progress bar on stderr (nothing when not ``enabled``)."""
    if not enabled:
        return lambda n: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress("[progress.description]{task.description}", BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(), transient=False)
    progress.start()
    task = progress.add_task(what, total=total)

    def advance(n: int) -> None:
        progress.advance(task, n)
        if progress.tasks[task].finished:
            progress.stop()

    return advance


def _check_chunk(codes: Any, labels: Any, split: SplitSource, start: int, stop: int,
                 num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    codes, labels = np.asarray(codes), np.asarray(labels)
    want = (stop - start, *split.image_shape)
    if codes.dtype != np.uint8 or codes.shape != want:
        raise DatasetFormatError(f"{where}: rows {start}..{stop - 1} read as {codes.dtype} "
                                 f"{codes.shape}, expected uint8 {want}; check the source files")
    if labels.shape != (stop - start,):
        raise DatasetFormatError(f"{where}: rows {start}..{stop - 1} gave {labels.shape} "
                                 "labels; check the source files")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(f"{where}: labels of rows {start}..{stop - 1} outside "
                                 f"0..{num_classes - 1}; check the source files")
    return codes, labels


def _open_sized(path: Path, size: int, fresh: bool) -> Any:
    """``path`` opened for positioned writes, ``size`` bytes long (a fresh file when
    ``fresh``, else the partial file of an interrupted preparation)."""
    f = open(path, "w+b" if fresh or not path.exists() else "r+b")  # noqa: SIM115
    f.truncate(size)
    return f


class RowFile:
    """A prepared split's uint8 images ``[N, C, H, W]`` on disk, read by rows.

    It answers what the library asks of a split's uint8 codes (``shape``, ``dtype``,
    ``device``, ``dim()``, ``len``, ``index_select(0, rows)`` and ``rows_file[index]``
    for an int, a slice or int64 rows) and reads only the rows asked for, with
    positioned reads (``os.preadv``; one read per run of consecutive rows), into a new
    tensor. Unlike a memory map, nothing stays mapped in the process afterwards: its
    resident memory does not grow with the rows an epoch has visited. The file is opened
    once per process (DataLoader workers open their own).
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.shape = torch.Size(shape)
        self.row_bytes = math.prod(self.shape[1:])
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"RowFile({str(self.path)!r}, shape={list(self.shape)})"

    def __getstate__(self) -> dict[str, Any]:  # pickled into spawned workers: no fd
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, buf: np.ndarray, row: int) -> None:
        offset = row * self.row_bytes
        if hasattr(os, "preadv"):
            got = os.preadv(self._file(), [buf], offset)
        else:  # no positioned reads (Windows): a private file object per call
            with open(self.path, "rb") as f:
                f.seek(offset)
                got = f.readinto(buf)
        if got != buf.nbytes:
            raise PreparedDataError(f"{self.path}: rows from {row} are cut short ({got} of "
                                    f"{buf.nbytes} bytes); {_FIX}")

    def take(self, rows: Any) -> torch.Tensor:
        """uint8 ``[len(rows), C, H, W]``: rows ``rows`` (int64, any order, repeats
        allowed) read from the file."""
        rows = np.asarray(torch.as_tensor(rows, dtype=torch.long).cpu().numpy()).reshape(-1)
        n = len(self)
        out = np.empty((rows.size, *self.shape[1:]), dtype=np.uint8)
        if not rows.size:
            return torch.from_numpy(out)
        if rows.min() < -n or rows.max() >= n:
            raise InputError(f"{self.path}: rows must lie in [0, {n})")
        rows = np.where(rows < 0, rows + n, rows)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        cuts = np.flatnonzero(np.diff(ordered) != 1) + 1  # runs of consecutive rows
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, rows.size], strict=True):
            if b - a == 1:
                self._read(out[order[a]], int(ordered[a]))
            else:
                run = np.empty((b - a, *self.shape[1:]), dtype=np.uint8)
                self._read(run, int(ordered[a]))
                out[order[a:b]] = run
        return torch.from_numpy(out)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise InputError("RowFile.index_select: only rows (dim 0) can be selected")
        return self.take(index)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if isinstance(index, (int, np.integer)):
            return self.take([int(index)])[0]
        return self.take(index)


def prepare(source: DatasetSource, root: str | os.PathLike, *, chunk_rows: int | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Write ``source``'s splits under ``root`` (see the module docstring); returns the
    directory. Already prepared (a complete directory for the same settings): returned as
    it is, after :func:`open_prepared`'s checks. ``chunk_rows``: rows per chunk (default:
    about 64 MB of images); ``progress``: a rich progress bar; ``log``: one line per event."""
    say = log or (lambda s: None)
    final = prepared_dir(root, source)
    if not (final / "header.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = _PrepareLock(final)
        if lock.acquire(say):  # else another process finished it while this one waited
            try:
                if not (final / "header.json").is_file():
                    _write(source, final, chunk_rows, progress, say, lock)
                    return final
            finally:
                lock.release()
    _check_expected(read_prepared_header(final), source, final / "header.json")
    say(f"prepare: {final} is ready")
    return final


def _write(source: DatasetSource, final: Path, chunk_rows: int | None, progress: bool,
           say: Callable[[str], None], lock: _PrepareLock) -> None:
    """The body of :func:`prepare`, under its lock: build ``final`` through ``.partial``."""
    partial = final.with_name(final.name + ".partial")
    identity = _identity(source)
    state = _read_progress(partial)
    if state is not None and state.get("identity") != identity:
        say(f"prepare: {partial} was begun for other settings or files: starting over")
        state = None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = {"identity": identity, "done": {s: 0 for s in _SPLITS},
                 "sums": {"count": 0, "sum": [0] * source.train.image_shape[0],
                          "sumsq": [0] * source.train.image_shape[0]}}
        atomic_write_json(partial / "progress.json", state)
    else:
        say(f"prepare: resuming {partial} at {state['done']}")
    k = len(source.class_names)
    for split_name in _SPLITS:
        split = source.split(split_name)
        if split.image_shape != source.train.image_shape and split.count:
            raise DatasetFormatError(f"{source.source or source.name}: {split_name} images are "
                                     f"{split.image_shape}, training images "
                                     f"{source.train.image_shape}")
        n, shape = split.count, (split.count, *split.image_shape)
        done = int(state["done"][split_name])
        row_bytes = math.prod(split.image_shape)
        # plain positioned writes, not a memory map: the written pages do not stay in
        # this process's resident set (a map would keep the whole split there)
        images = _open_sized(partial / f"{split_name}_images.u8", math.prod(shape), fresh=not done)
        labels = _open_sized(partial / f"{split_name}_labels.i64", 8 * n, fresh=not done)
        step = _rows_per_chunk(split.image_shape, chunk_rows)
        advance = _progress_bar(progress and done < n, n, f"prepare {source.name} {split_name}")
        advance(done)
        where = source.source or source.name
        for start in range(done, n, step):
            stop = min(n, start + step)
            codes, labs = _check_chunk(*split.read(start, stop), split, start, stop, k, where)
            images.seek(start * row_bytes)
            images.write(np.ascontiguousarray(codes).tobytes())
            labels.seek(start * 8)
            labels.write(labs.astype("<i8").tobytes())
            if split_name == "train" and source.mean is None:
                s = state["sums"]  # exact integer sums for the mean / std
                s["count"] += int(codes.shape[0] * codes.shape[2] * codes.shape[3])
                per_c = codes.transpose(1, 0, 2, 3).reshape(codes.shape[1], -1).astype(np.int64)
                s["sum"] = [a + int(b) for a, b in zip(s["sum"], per_c.sum(1), strict=True)]
                s["sumsq"] = [a + int(b) for a, b in
                              zip(s["sumsq"], (per_c * per_c).sum(1), strict=True)]
            for f in (images, labels):  # on disk before progress.json says so
                f.flush()
                os.fsync(f.fileno())
            state["done"][split_name] = stop
            atomic_write_json(partial / "progress.json", state)
            lock.touch()
            advance(stop - start)
        images.close()
        labels.close()
    say(f"prepare: hashing {partial}")
    _finish(source, partial, state, lock.touch)
    os.replace(partial, final)
    say(f"prepare: {final} written")


#: a preparation touches its lock after every chunk and every file it hashes; a lock left
#: untouched this long belongs to a preparation that died (on another node) and is taken over
LOCK_STALE_SECONDS = 900.0
#: how often a preparation waiting for another one looks again
LOCK_POLL_SECONDS = 5.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class _PrepareLock:
    """``<name>-<key>.lock`` beside the prepared directory: one preparation of a directory
    at a time, also across the nodes of a shared filesystem (created with ``O_EXCL``;
    it names its holder, host and pid). Another process finds it and waits until the
    directory is complete, or takes it over when its holder has ended (a pid of this host
    that no longer runs) or left it untouched for :data:`LOCK_STALE_SECONDS`."""

    def __init__(self, final: Path) -> None:
        self.path = final.with_name(final.name + ".lock")
        self.final = final
        self.token = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(6)}"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        return True

    def _holder(self) -> tuple[str, float] | None:
        try:
            return self.path.read_text().strip(), time.time() - self.path.stat().st_mtime
        except OSError:
            return None  # released meanwhile

    @staticmethod
    def _ended(holder: str) -> bool:
        parts = holder.split()
        return (len(parts) >= 2 and parts[0] == socket.gethostname() and parts[1].isdigit()
                and not _pid_alive(int(parts[1])))

    def acquire(self, say: Callable[[str], None]) -> bool:
        """Hold the lock (True), or return False once another process has completed the
        directory while this one waited."""
        waiting = False
        while True:
            if (self.final / "header.json").is_file():
                return False
            if self._create():
                return True
            seen = self._holder()
            if seen is None:
                continue
            holder, age = seen
            if self._ended(holder) or age > LOCK_STALE_SECONDS:
                why = "its process has ended" if self._ended(holder) else \
                    f"untouched for {age:.0f} s"
                say(f"prepare: taking over {self.path} from {holder.split()[:2]} ({why})")
                current = self._holder()  # still the same holder: not a new one's lock
                if current is not None and current[0] == holder:
                    self.path.unlink(missing_ok=True)
                continue
            if not waiting:
                say(f"prepare: {self.final.name} is being prepared by {holder.split()[:2]} "
                    f"({self.path}): waiting for it")
                waiting = True
            time.sleep(LOCK_POLL_SECONDS)

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        seen = self._holder()
        if seen is not None and seen[0] == self.token:
            self.path.unlink(missing_ok=True)


def _read_progress(partial: Path) -> dict[str, Any] | None:
    try:
        return json.loads((partial / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def _mean_std(source: DatasetSource, sums: dict[str, Any]) -> tuple[list[float], list[float]]:
    if source.mean is not None and source.std is not None:
        return list(source.mean), list(source.std)
    n, scale = sums["count"], float(source.pixel_scale)
    if n == 0:
        raise DatasetFormatError(f"{source.source or source.name}: no training images")
    mean = [a / n / scale for a in sums["sum"]]
    std = [math.sqrt(max(0.0, q / n / scale**2 - m * m)) for q, m in zip(sums["sumsq"], mean,
                                                                          strict=True)]
    return mean, std


def _finish(source: DatasetSource, partial: Path, state: dict[str, Any],
            touch: Callable[[], None] = lambda: None) -> None:
    """The class indexes, the hashes and the header, inside ``partial`` (``touch`` after
    every file hashed: hashing a large split takes minutes)."""
    splits: dict[str, Any] = {}
    k = len(source.class_names)
    for split_name in _SPLITS:
        split = source.split(split_name)
        labels = np.fromfile(partial / f"{split_name}_labels.i64", dtype="<i8")
        order = np.argsort(labels, kind="stable").astype("<i8")
        order.tofile(partial / f"{split_name}_class_index.i64")
        counts = np.bincount(labels, minlength=k)
        files = {f"{split_name}_{part}": f"{split_name}_{part}"
                 for part in ("images.u8", "labels.i64", "class_index.i64")}
        splits[split_name] = {
            "count": split.count,
            "shape": list(split.image_shape),
            "class_offsets": [0] + np.cumsum(counts).tolist(),
            "files": {name: {"sha256": _hashed(partial / name, touch) if split.count else None}
                      for name in files.values()},
            "source_files": list(split.files),
        }
    mean, std = _mean_std(source, state["sums"])
    head = header(PREPARED_FORMAT, PREPARED_VERSION)
    head.update({
        "name": source.name,
        "settings": _jsonable(source.settings),
        "source": source.source,
        "class_names": list(source.class_names),
        "mean": mean,
        "std": std,
        "pixel_scale": float(source.pixel_scale),
        "splits": splits,
    })
    atomic_write_json(partial / "header.json", head)
    (partial / "progress.json").unlink()


def _hashed(path: Path, touch: Callable[[], None]) -> str:
    digest = file_sha256(path)
    touch()
    return digest


_FIX = "delete the directory and run `lightning-distill prepare` again"


def read_prepared_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked ``header.json`` of a prepared directory."""
    path = Path(directory) / "header.json"
    if not path.is_file():
        partial = Path(directory).with_name(Path(directory).name + ".partial")
        hint = (f" (an unfinished preparation is in {partial}: run `lightning-distill "
                "prepare` to finish it)") if partial.is_dir() else ""
        raise MissingFileError(f"{path}: no prepared data here{hint}; run `lightning-distill "
                               "prepare` for this data set")
    try:
        head = json.loads(path.read_text())
    except ValueError as e:
        raise PreparedDataError(f"{path}: not JSON ({e}); {_FIX}") from e
    check_header(head, PREPARED_FORMAT, PREPARED_VERSION, path, fix=_FIX,
                 error=PreparedDataError)
    return head


def _check_expected(head: dict[str, Any], source: DatasetSource, where: Path) -> None:
    """Refuse a header written for another data set name or other settings."""
    want = {"name": source.name, "settings": _jsonable(source.settings)}
    got = {"name": head.get("name"), "settings": head.get("settings")}
    if want != got:
        raise PreparedDataError(f"{where}: prepared for {got}, not {want}; {_FIX}")


def open_prepared(directory: str | os.PathLike, *, expect: DatasetSource | None = None,
                  verify: bool = False) -> RealDataset:
    """A :class:`RealDataset` over a prepared directory's files (see the module
    docstring). ``expect``: the source it must have been prepared from (same name and
    settings); ``verify``: re-hash every file against the header."""
    directory = Path(directory)
    head = read_prepared_header(directory)
    where = directory / "header.json"
    if expect is not None:
        _check_expected(head, expect, where)
    arrays: dict[str, Any] = {}
    index: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for split_name in _SPLITS:
        info = head["splits"][split_name]
        n, shape = int(info["count"]), tuple(int(s) for s in info["shape"])
        for part, dtype, part_shape in (("images.u8", np.uint8, (n, *shape)),
                                        ("labels.i64", "<i8", (n,)),
                                        ("class_index.i64", "<i8", (n,))):
            name = f"{split_name}_{part}"
            path = directory / name
            size = math.prod(part_shape) * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != size:
                got_size = path.stat().st_size if path.is_file() else "missing"
                raise PreparedDataError(f"{path}: {got_size} bytes, expected {size}; {_FIX}")
            if verify and n and file_sha256(path) != info["files"][name]["sha256"]:
                raise PreparedDataError(f"{path}: SHA-256 differs from the header's; {_FIX}")
            # the images are read by rows when asked for; labels and the class index
            # (8 bytes a row) are read whole
            arrays[name] = (RowFile(path, part_shape) if part == "images.u8"
                            else torch.from_numpy(np.fromfile(path, dtype=dtype)))
        index[split_name] = (arrays[f"{split_name}_class_index.i64"],
                             [int(o) for o in info["class_offsets"]])
    return RealDataset(
        name=head["name"],
        train_data=arrays["train_images.u8"],
        train_labels=arrays["train_labels.i64"],
        test_data=arrays["test_images.u8"],
        test_labels=arrays["test_labels.i64"],
        mean=tuple(head["mean"]),
        std=tuple(head["std"]),
        class_names=tuple(head["class_names"]),
        pixel_scale=float(head["pixel_scale"]),
        source=str(directory),
        class_index=index,
    )


def prepare_if_needed(source: DatasetSource, root: str | os.PathLike,
                      log: Callable[[str], None] | None = None, progress: bool = False
                      ) -> RealDataset:
    """:func:`open_prepared` of ``source``'s directory under ``root``, preparing it first
    when it is not there (on first use)."""
    start = time.monotonic()
    directory = prepare(source, root, progress=progress, log=log)
    real = open_prepared(directory, expect=source)
    if log:
        log(f"prepare: {source.name} mapped from {directory} in "
            f"{time.monotonic() - start:.1f} s")
    return real
