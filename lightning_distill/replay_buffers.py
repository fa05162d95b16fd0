"""Import of MTT / DATM replay buffers into a :class:`~lightning_distill.TrajectoryStore`.

The public code of MTT and DATM saves its experts as ``replay_buffer_<n>.pt`` files: a
list of experts, each a list of snapshots, each a list of parameter tensors in the
network's parameter order (``[p.detach().cpu() for p in net.parameters()]``).
:func:`import_replay_buffers` converts them into a store (docs/formats.md, section
'Importing MTT / DATM replay buffers'), checking every tensor's shape against the model.

Example::

    store = import_replay_buffers("buffers/CIFAR10/ConvNet", "outputs/cifar10/experts",
                                  model={"name": "ConvNet", "channels": 3, "num_classes": 10,
                                         "image_size": [32, 32]},
                                  dataset="cifar10")
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.input_space import InputSpace
from .errors import MissingFileError
from .models.params import ParamSpec
from .trajectories import TrajectoryStore, TrajectoryStoreError

__all__ = ["import_replay_buffers"]


def _natural_key(path: Path) -> tuple:
    return tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name))


def _expand_buffer_files(files: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(p.glob("replay_buffer_*.pt"), key=_natural_key)
            if not found:
                raise MissingFileError(f"no replay_buffer_*.pt files in directory {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise MissingFileError(f"replay buffer file {p} not found")
    return out


def _load_buffer(path: Path) -> list:
    try:
        try:
            buf = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            buf = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:
        raise TrajectoryStoreError(
            f"{path}: cannot load replay buffer ({type(e).__name__}: {str(e)[:200]}); it must "
            "be an MTT/DATM replay_buffer_*.pt (a list of experts, each a list of snapshots, "
            "each a list of parameter tensors)"
        ) from e
    if not isinstance(buf, (list, tuple)):
        raise TrajectoryStoreError(
            f"{path}: a replay buffer holds a list of experts, found {type(buf).__name__}"
        )
    for j, expert in enumerate(buf):
        if not isinstance(expert, (list, tuple)) or not expert:
            raise TrajectoryStoreError(
                f"{path}: expert {j} must be a non-empty list of snapshots, "
                f"found {type(expert).__name__}"
            )
    return list(buf)


def _flatten_snapshot(snap: Any, spec: ParamSpec, where: str) -> Tensor:
    """Check one snapshot (list of parameter tensors, or an already flat [P]) and flatten it."""
    if isinstance(snap, Tensor) and snap.dim() == 1 and snap.numel() == spec.total:
        return snap.to(torch.float32)
    if not isinstance(snap, (list, tuple)):
        raise TrajectoryStoreError(
            f"{where}: expected a list of {len(spec.names)} parameter tensors, "
            f"found {type(snap).__name__}"
        )
    if len(snap) != len(spec.names):
        raise TrajectoryStoreError(
            f"{where}: {len(snap)} parameter tensors, the model has {len(spec.names)} "
            f"({', '.join(spec.names[:4])}{', ...' if len(spec.names) > 4 else ''}); "
            "wrong model for this buffer?"
        )
    for k, (t, name, shape) in enumerate(zip(snap, spec.names, spec.shapes, strict=True)):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise TrajectoryStoreError(
                f"{where}: parameter #{k} ({name}) has shape {got}, the model expects "
                f"{list(shape)}; wrong model kwargs (width/depth/norm/image size) for this buffer?"
            )
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in snap])


def import_replay_buffers(
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    model: dict,
    dataset: str,
    input_space: InputSpace | dict | None = None,
    hparams: dict | None = None,
    spec: ParamSpec | None = None,
    truncate: bool = False,
) -> TrajectoryStore:
    """Convert MTT/DATM ``replay_buffer_*.pt`` files into a :class:`TrajectoryStore`.

    Each file holds a list of experts; an expert is a list of snapshots; a snapshot a
    list of parameter tensors in the network's parameter order (as the reference
    ``buffer.py`` saves ``[p.detach().cpu() for p in net.parameters()]``). Experts are
    numbered in file order, then list order; a directory in ``files`` expands to its
    ``replay_buffer_*.pt`` in numeric order. ``spec`` defaults to the parameters of
    ``build_model(**model)``; every tensor's shape is checked against it. All experts
    must have the same number of snapshots, unless ``truncate=True`` keeps the first
    ``min`` snapshots of each. Resumable: experts already in the store are skipped.
    ``input_space`` should describe the buffers' input space (e.g. ZCA, which DATM's
    CIFAR buffers use); an empty dict means "unknown".
    """
    paths = _expand_buffer_files(files)
    if spec is None:
        from .models import build_model

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
        spec = ParamSpec.of(build_model(**kwargs))

    # Pass 1 (memory-mapped, cheap): structure and snapshot counts of every expert.
    counts: list[tuple[Path, int, int]] = []  # (file, expert in file, snapshots)
    per_file: list[int] = []
    for path in paths:
        buf = _load_buffer(path)
        counts.extend((path, j, len(expert)) for j, expert in enumerate(buf))
        per_file.append(len(buf))
        del buf
    if not counts:
        raise TrajectoryStoreError(f"the replay buffers {[str(p) for p in paths]} hold no experts")
    lengths = sorted({n for _, _, n in counts})
    num_snapshots = lengths[0]
    if len(lengths) > 1 and not truncate:
        longest = next(c for c in counts if c[2] == lengths[-1])
        shortest = next(c for c in counts if c[2] == lengths[0])
        raise TrajectoryStoreError(
            f"experts have different numbers of snapshots ({lengths}): e.g. {shortest[0]} "
            f"expert {shortest[1]} has {shortest[2]}, {longest[0]} expert {longest[1]} has "
            f"{longest[2]}; pass truncate=True to keep the first {lengths[0]} of each"
        )

    meta_hparams = {
        **(hparams or {}),
        "imported_from": [p.name for p in paths],
    }
    store = TrajectoryStore.create(
        store_path,
        spec=spec,
        num_snapshots=num_snapshots,
        model=model,
        dataset=dataset,
        input_space=input_space,
        hparams=meta_hparams,
    )
    present = set(store.expert_indices())
    index = 0
    for path, n_here in zip(paths, per_file, strict=True):
        todo = [j for j in range(n_here) if index + j not in present]
        if todo:
            buf = _load_buffer(path)
            for j in todo:
                expert = buf[j]
                rows = [
                    _flatten_snapshot(
                        expert[s], spec, f"{path}: expert {j} (store index {index + j}), "
                        f"snapshot {s}"
                    )
                    for s in range(num_snapshots)
                ]
                store.write_expert(index + j, torch.stack(rows))
            del buf
        index += n_here
    return store
