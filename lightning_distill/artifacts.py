"""What every artifact the library writes shares: one header and one hash.

A trajectory store's ``meta.json``, a synthetic set, a difficulty-score file and a
``results.json`` each start with the same header (docs/formats.md, 'Header')::

    {"format": "lightning_distill.SyntheticSet", "format_version": 1,
     "library_version": "0.1.0.dev0", "created": "2026-12-06T05:00:00+00:00",
     "input_space": {...} or None, ...the format's own fields}

and are checked on reading by :func:`check_header` (the format's own fields by a
``_check_*`` function beside it). Files written before the header carry only some of
these fields: they are still read (a missing ``format`` is taken as the one expected,
the other fields as unknown). :func:`sha256` is the one hash of tensors and bytes
(stores, score files, results rows and data identities use it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import DataFormatError, InputError, LightningDistillError

__all__ = ["HEADER_FIELDS", "TensorChunks", "check_header", "file_sha256", "header", "sha256"]

#: the header's fields, in order
HEADER_FIELDS = ("format", "format_version", "library_version", "created", "input_space")


def header(format: str, format_version: int, input_space: Any = None) -> dict[str, Any]:
    """The header of a new artifact of ``format`` (``input_space``: the data's input
    space as a JSON value, ``InputSpace.to_dict()``, or None where it has none)."""
    return {"format": format, "format_version": int(format_version),
            "library_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input_space": input_space}


def check_header(obj: Any, format: str, format_version: int, where: str | os.PathLike,
                 *, fix: str, error: Callable[[str], LightningDistillError] = DataFormatError,
                 legacy_format_key: str | None = None) -> None:
    """Refuse ``obj`` (a file's top-level mapping, read from ``where``) unless it is an
    artifact of ``format`` at a version this library reads (at most ``format_version``);
    ``fix`` says what to do. ``legacy_format_key``: the key an older writer used for the
    format name (a synthetic set's ``kind``)."""
    if not isinstance(obj, dict):
        raise error(f"{where}: not a {format} file (a {type(obj).__name__}, not a mapping); "
                    f"{fix}")
    name = obj.get("format", obj.get(legacy_format_key) if legacy_format_key else None)
    if name is not None and name != format:
        raise error(f"{where}: a {name} file, not a {format} file; {fix}")
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{where}: not a {format} file (no integer format_version); {fix}")
    if version > format_version:
        raise error(f"{where}: {format} format_version {version} is newer than "
                    f"lightning_distill {__version__} reads ({format_version}); upgrade "
                    "lightning_distill")
    if version < 1:
        raise error(f"{where}: {format} format_version {version} is not supported; {fix}")


@dataclass(frozen=True)
class TensorChunks:
    """A tensor that :func:`sha256` hashes chunk by chunk, never whole: its ``dtype``, its
    ``shape`` and ``chunks()``, an iterable of its consecutive row blocks (each
    ``[rows, *shape[1:]]``, together ``shape[0]`` rows). The digest is exactly that of
    the whole tensor (the same dtype, shape and bytes in order), so a split read in
    batches hashes as the same split held in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]


def _hash_chunks(h: Any, part: TensorChunks) -> None:
    name = torch.empty(0, dtype=part.dtype).numpy().dtype
    shape = [int(s) for s in part.shape]
    h.update(f"{name}{shape}".encode())
    rows = 0
    for chunk in part.chunks():
        a = chunk.detach().cpu().contiguous().numpy()
        if a.dtype != name or list(a.shape[1:]) != shape[1:]:
            raise InputError(
                f"sha256: a chunk of {a.dtype}{list(a.shape)} in a tensor of {name}{shape}")
        rows += int(a.shape[0])
        h.update(memoryview(a).cast("B"))
    if rows != shape[0]:
        raise InputError(f"sha256: chunks of {rows} rows for a tensor of {shape}")


def sha256(*parts: torch.Tensor | TensorChunks | bytes | str, length: int | None = None) -> str:
    """SHA-256 of ``parts`` in order (hex; the first ``length`` digits when given): a
    tensor by its dtype, shape and bytes (CPU, contiguous), a :class:`TensorChunks` as
    the tensor it stands for (the same digest), bytes as they are, a string as UTF-8."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            a = part.detach().cpu().contiguous().numpy()
            h.update(f"{a.dtype}{list(a.shape)}".encode())
            h.update(memoryview(a).cast("B"))
        elif isinstance(part, TensorChunks):
            _hash_chunks(h, part)
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    digest = h.hexdigest()
    return digest[:length] if length else digest


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
