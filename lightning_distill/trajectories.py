"""TrajectoryStore: expert trajectories on disk, read lazily.

The experts of MTT (Cazenavette et al., CVPR 2022); docs/method.md, section 'Expert
trajectories', and docs/formats.md, section 'Trajectory store'.

An expert trajectory is the sequence theta_0, theta_1, ..., theta_E of an expert
network's flat parameter vector at initialisation and after every epoch (E+1
snapshots). Trajectory matching (MTT section 3) samples theta_t and theta_{t+M}
from it. The on-disk format (docs/formats.md) is a directory::

    meta.json           format_version, dataset, model (build_model kwargs), param spec,
                        num_snapshots, num_params, hparams, input_space, created, versions
    expert_00000.pt     float32 tensor [num_snapshots, P], rows in named_parameters() order
    expert_00001.pt     ...

Each expert file is written atomically (:mod:`lightning_distill.io`), so a present
``expert_*.pt`` is complete and an interrupted run resumes at :meth:`first_missing`.
Reads memory-map the files (``torch.load(mmap=True)``): a 13 GB DATM store for
CIFAR-10 (100 experts x 101 snapshots) costs only the rows read.

:func:`lightning_distill.replay_buffers.import_replay_buffers` (also
``lightning_distill.import_replay_buffers``) converts MTT/DATM ``replay_buffer_*.pt``
files into a store.

Example::

    store = TrajectoryStore.open("outputs/cifar10/experts")
    net = store.build_model()
    theta_start = store.snapshot(3, epoch=20)       # Tensor[P], a copy
    theta_target = store.snapshot(3, epoch=22)
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .artifacts import check_header, header
from .data.input_space import InputSpace
from .errors import InputError, InputTypeError, StateError
from .io import atomic_save, atomic_write_json
from .models.params import ParamSpec

__all__ = ["TrajectoryStore", "TrajectoryStoreError"]

FORMAT = "lightning_distill.TrajectoryStore"
FORMAT_VERSION = 1
META_FILE = "meta.json"
_EXPERT_RE = re.compile(r"^expert_(\d{5,})\.pt$")
# Fields that must agree when a store is re-created (resumed): experts trained
# with different values must never share a store.
_IDENTITY_FIELDS = ("spec", "num_snapshots", "model", "dataset", "input_space")
_REQUIRED_FIELDS = ("format_version", *_IDENTITY_FIELDS)
_REGENERATE = "delete it and re-run `lightning-distill experts` to regenerate it"


def _check_meta(meta: Any, meta_path: Path) -> None:
    """Refuse a store's ``meta.json`` that is not one this library reads: the header
    (:func:`~lightning_distill.artifacts.check_header`), the identity fields, a spec and
    snapshot count that fit together."""
    check_header(meta, FORMAT, FORMAT_VERSION, meta_path, error=TrajectoryStoreError,
                 fix="restore it or regenerate the store")
    missing = [k for k in _REQUIRED_FIELDS if k not in meta]
    if missing:
        raise TrajectoryStoreError(f"{meta_path} lacks required field(s) {missing}")
    try:
        spec = ParamSpec.from_json(meta["spec"])
        num_snapshots = int(meta["num_snapshots"])
    except (KeyError, TypeError, ValueError) as e:
        raise TrajectoryStoreError(f"{meta_path}: malformed 'spec' or 'num_snapshots' ({e})") from e
    if len(spec.names) != len(spec.shapes) or num_snapshots < 1:
        raise TrajectoryStoreError(f"{meta_path}: inconsistent 'spec' or 'num_snapshots'")


class TrajectoryStoreError(StateError):
    """A trajectory store (or a file in it) is missing, corrupt, or inconsistent."""


def _jsonable(x: Any) -> Any:
    """Normalise ``x`` to what a JSON round trip gives (tuples -> lists), for comparison."""
    try:
        return json.loads(json.dumps(x))
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"value is not JSON-serialisable: {x!r} ({e})") from e


def _same_identity(field: str, stored: Any, new: Any) -> bool:
    """Whether a store's identity ``field`` equals this run's (input spaces as InputSpace:
    the same fields, however an older file spelled them)."""
    if field == "input_space":
        try:
            return InputSpace.from_dict(stored) == InputSpace.from_dict(new)
        except ValueError:
            return False
    return stored == new


def _spec_mismatch(expected: ParamSpec, got: ParamSpec) -> str | None:
    """Describe the first difference between two specs, or None if they are equal."""
    for k, (ne, se, ng, sg) in enumerate(
        zip(expected.names, expected.shapes, got.names, got.shapes, strict=False)
    ):
        if ne != ng or se != sg:
            return (
                f"parameter #{k}: store has {ne} {list(se)}, model has {ng} {list(sg)}"
            )
    if len(expected.names) != len(got.names):
        return (
            f"store has {len(expected.names)} parameter tensors, model has {len(got.names)}"
        )
    return None


class TrajectoryStore:
    """A directory of expert trajectories; see the module docstring for the format.

    Use :meth:`create` (new or resumed store) or :meth:`open` (existing store) rather
    than the constructor. ``cache_size`` memory-mapped expert files are kept open
    between reads (invalidated when a file changes on disk).
    """

    def __init__(self, path: str | os.PathLike, meta: dict, *, cache_size: int = 8) -> None:
        self.path = Path(path)
        self.meta = meta
        self.spec = ParamSpec.from_json(meta["spec"])
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, tuple[tuple[int, ...], Tensor]] = OrderedDict()

    def __getstate__(self) -> dict:
        # Pickled (e.g. to ddp_spawn workers) without the memory-mapped tensors.
        return {**self.__dict__, "_cache": OrderedDict()}

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        spec: ParamSpec,
        num_snapshots: int,
        model: dict,
        dataset: str,
        input_space: InputSpace | dict | None = None,
        hparams: dict | None = None,
        exist_ok: bool = True,
    ) -> TrajectoryStore:
        """Create a store at ``path``, or return the existing one if its meta.json agrees.

        ``model`` is the keyword dict of :func:`lightning_distill.models.build_model`
        (``name``, ``channels``, ``num_classes``, ``image_size``, extra kwargs);
        ``input_space`` identifies the model's input space (an :class:`InputSpace` or its
        dict; None: unknown); ``hparams`` records the training hyperparameters. An
        existing store must agree on spec, num_snapshots, model, dataset and input_space
        (the latter as equal :class:`InputSpace` fields; otherwise
        :class:`TrajectoryStoreError` names the field), so a resumed run can never mix
        experts of two configurations. Differing ``hparams`` only warn.
        """
        if int(num_snapshots) < 1:
            raise InputError(f"num_snapshots must be >= 1 (epochs + 1), got {num_snapshots}")
        if "name" not in model:
            raise InputError(f"model dict needs a 'name' key (build_model kwargs), got {model!r}")
        meta = {
            **header(FORMAT, FORMAT_VERSION,
                     _jsonable(InputSpace.coerce(input_space).to_dict())),
            "dataset": str(dataset),
            "model": _jsonable(dict(model)),
            "spec": spec.to_json(),
            "num_params": spec.total,
            "num_snapshots": int(num_snapshots),
            "dtype": "float32",
            "hparams": _jsonable(dict(hparams or {})),
            "torch_version": torch.__version__,
        }
        root = Path(path)
        meta_path = root / META_FILE
        if meta_path.exists():
            if not exist_ok:
                raise TrajectoryStoreError(
                    f"{root} already holds a trajectory store ({meta_path}); pass exist_ok=True "
                    "to resume it or choose another directory"
                )
            store = cls.open(root)
            for field in _IDENTITY_FIELDS:
                if not _same_identity(field, store.meta[field], meta[field]):
                    raise TrajectoryStoreError(
                        f"{meta_path}: field '{field}' differs from this run "
                        f"(store: {json.dumps(store.meta[field])[:300]}, "
                        f"run: {json.dumps(meta[field])[:300]}); experts of different "
                        "configurations cannot share a store: use another directory or "
                        "delete the old store"
                    )
            if store.meta.get("hparams") != meta["hparams"]:
                old, new = store.meta.get("hparams") or {}, meta["hparams"]
                keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                warnings.warn(
                    f"{meta_path}: training hyperparameters differ from this run in {keys}; "
                    "keeping the store's meta.json",
                    stacklevel=2,
                )
            return store
        if root.exists() and any(_EXPERT_RE.match(p.name) for p in root.iterdir()):
            raise TrajectoryStoreError(
                f"{root} holds expert files but no {META_FILE}: cannot tell what they are; "
                "restore meta.json or use an empty directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, meta)
        return cls(root, meta)

    @classmethod
    def create_for_model(
        cls,
        path: str | os.PathLike,
        *,
        name: str,
        channels: int,
        num_classes: int,
        image_size: int | Iterable[int],
        model_kwargs: dict[str, Any] | None = None,
        num_snapshots: int,
        dataset: str,
        input_space: InputSpace | dict | None = None,
        hparams: dict | None = None,
        exist_ok: bool = True,
    ) -> TrajectoryStore:
        """:meth:`create` for experts of the registered model ``name``: the ``model`` entry
        is ``{"name", "channels", "num_classes", "image_size": [H, W], **model_kwargs}``
        (what ``build_model(...).model_config`` holds) and the spec is that model's,
        computed from a build on the ``meta`` device (no memory, no draw from any random
        generator). The experts stage and :class:`~lightning_distill.callbacks.TrajectoryRecorder`
        (a store it creates from the module) both create their stores here."""
        from .models import build_model, to_hw

        model = {"name": name, "channels": int(channels), "num_classes": int(num_classes),
                 "image_size": list(to_hw(image_size)), **dict(model_kwargs or {})}
        with torch.device("meta"):
            net = build_model(**model)
        return cls.create(path, spec=ParamSpec.of(net), num_snapshots=num_snapshots,
                          model=model, dataset=dataset, input_space=input_space,
                          hparams=hparams, exist_ok=exist_ok)

    @classmethod
    def open(cls, path: str | os.PathLike, *, cache_size: int = 8) -> TrajectoryStore:
        """Open an existing store, validating its meta.json."""
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise TrajectoryStoreError(
                f"{meta_path} not found: {root} is not a trajectory store (create one with "
                "`lightning-distill experts` or import_replay_buffers)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrajectoryStoreError(
                f"{meta_path} is unreadable or corrupt ({e}); restore it or regenerate the store"
            ) from e
        _check_meta(meta, meta_path)
        return cls(root, meta, cache_size=cache_size)

    # ---------------------------------------------------------------- properties
    @property
    def num_snapshots(self) -> int:
        """Snapshots per expert (epochs + 1)."""
        return int(self.meta["num_snapshots"])

    @property
    def num_params(self) -> int:
        """P, the length of a flat parameter vector."""
        return self.spec.total

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def model(self) -> dict:
        """The build_model keyword dict (a copy)."""
        return dict(self.meta["model"])

    @property
    def input_space(self) -> InputSpace:
        """The experts' input space (``meta.json``'s ``input_space``, read as an InputSpace)."""
        return InputSpace.from_dict(self.meta["input_space"])

    @property
    def hparams(self) -> dict:
        return dict(self.meta.get("hparams") or {})

    def expert_path(self, index: int) -> Path:
        """Path of expert ``index``'s file (whether or not it exists)."""
        if int(index) < 0:
            raise IndexError(f"expert index must be >= 0, got {index}")
        return self.path / f"expert_{int(index):05d}.pt"

    def require_written(self, indices: Iterable[int]) -> None:
        """Refuse to go on when an expert that just finished training has no file (its
        Trainer stopped before the last epoch, so its recorder wrote nothing)."""
        for i in indices:
            if not self.expert_path(i).is_file():
                raise TrajectoryStoreError(
                    f"expert {i} finished training but {self.expert_path(i)} was not written "
                    "(training stopped before the last epoch?); see the warnings above")

    def expert_indices(self) -> list[int]:
        """Sorted indices of the expert files present (complete by construction)."""
        if not self.path.is_dir():
            return []
        found = (_EXPERT_RE.match(p.name) for p in self.path.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    @property
    def num_experts(self) -> int:
        return len(self.expert_indices())

    def __len__(self) -> int:
        return self.num_experts

    def first_missing(self) -> int:
        """Smallest index without an expert file: where an interrupted run resumes."""
        present = set(self.expert_indices())
        i = 0
        while i in present:
            i += 1
        return i

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.path)!r}, experts={self.num_experts}, "
            f"snapshots={self.num_snapshots}, params={self.num_params}, "
            f"model={self.meta['model'].get('name')!r}, dataset={self.dataset!r})"
        )

    # -------------------------------------------------------------------- writes
    def write_expert(self, index: int, snapshots: Tensor) -> Path:
        """Write expert ``index``: ``snapshots`` [num_snapshots, P], stored as float32.

        Atomic: the file appears complete or not at all. Overwrites an existing file.
        """
        if not isinstance(snapshots, Tensor) or not snapshots.is_floating_point():
            raise InputTypeError(
                f"snapshots must be a floating-point Tensor, got {type(snapshots)}")
        expected = (self.num_snapshots, self.num_params)
        if tuple(snapshots.shape) != expected:
            raise InputError(
                f"expert {index}: snapshots have shape {list(snapshots.shape)}, the store "
                f"({self.path / META_FILE}) expects {list(expected)} [num_snapshots, P]"
            )
        t = snapshots.detach().to("cpu", torch.float32).contiguous()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * 4:
            t = t.clone()  # torch.save writes the whole storage: keep only this tensor's bytes
        if not bool(torch.isfinite(t).all()):
            warnings.warn(f"expert {index}: snapshots contain NaN/Inf (diverged?)", stacklevel=2)
        path = self.expert_path(index)
        self._cache.pop(int(index), None)
        atomic_save(t, path)
        return path

    # --------------------------------------------------------------------- reads
    def _load(self, index: int, mmap: bool) -> Tensor:
        path = self.expert_path(index)
        if not path.is_file():
            raise TrajectoryStoreError(
                f"{path} not found: expert {index} is missing from the store "
                f"(present: {self.num_experts} experts, first missing {self.first_missing()}); "
                "run `lightning-distill experts` to train it"
            )
        expected = (self.num_snapshots, self.num_params)
        size = path.stat().st_size
        if size < expected[0] * expected[1] * 4:
            raise TrajectoryStoreError(
                f"{path} is truncated ({size} bytes, the data alone needs "
                f"{expected[0] * expected[1] * 4}); {_REGENERATE}"
            )
        try:
            t = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:  # zip/pickle errors surface as RuntimeError, ValueError, ...
            raise TrajectoryStoreError(
                f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                f"{_REGENERATE}"
            ) from e
        if not isinstance(t, Tensor):
            raise TrajectoryStoreError(
                f"{path} holds a {type(t).__name__}, expected a float32 tensor "
                f"{list(expected)}; {_REGENERATE}"
            )
        if t.dtype != torch.float32 or tuple(t.shape) != expected:
            raise TrajectoryStoreError(
                f"{path} holds a {str(t.dtype).removeprefix('torch.')} tensor of shape "
                f"{list(t.shape)}, but "
                f"{self.path / META_FILE} says float32 {list(expected)} "
                f"[num_snapshots, P]; {_REGENERATE}"
            )
        return t

    def _mapped(self, index: int) -> Tensor:
        """The memory-mapped tensor of expert ``index`` (LRU cache keyed by inode/mtime/size)."""
        index = int(index)
        try:
            st = self.expert_path(index).stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        hit = self._cache.get(index)
        if hit is not None and key is not None and hit[0] == key:
            self._cache.move_to_end(index)
            return hit[1]
        t = self._load(index, mmap=True)
        if self.cache_size > 0 and key is not None:
            self._cache[index] = (key, t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return t

    def load_expert(self, index: int, mmap: bool = True) -> Tensor:
        """Expert ``index`` as a [num_snapshots, P] float32 tensor.

        With ``mmap=True`` the tensor is backed by the file (pages are read on access;
        do not modify it in place); ``mmap=False`` reads the whole file into memory.
        """
        return self._mapped(index) if mmap else self._load(index, mmap=False)

    def _epoch(self, epoch: int) -> int:
        e, n = int(epoch), self.num_snapshots
        if not -n <= e < n:
            raise IndexError(
                f"epoch {epoch} out of range: the store has {n} snapshots (0..{n - 1})"
            )
        return e % n

    def snapshot(self, index: int, epoch: int) -> Tensor:
        """theta_epoch of expert ``index``, a new [P] tensor (negative epochs count back from E)."""
        return self._mapped(index)[self._epoch(epoch)].clone()

    def snapshots(self, index: int, epochs: Iterable[int]) -> Tensor:
        """Several snapshots of expert ``index`` as a new [len(epochs), P] tensor."""
        rows = torch.tensor([self._epoch(e) for e in epochs], dtype=torch.long)
        return self._mapped(index).index_select(0, rows)

    def final_snapshot(self, index: int) -> Tensor:
        """The last snapshot (the trained expert) of expert ``index``, a new [P] tensor."""
        return self.snapshot(index, self.num_snapshots - 1)

    def validate(self, deep: bool = False, checksums: bool = False) -> list[int]:
        """Check the store; return the expert indices present.

        Always: every expert file is at least as large as its data. ``deep=True`` also
        loads each file's header (memory-mapped, no data read) and checks dtype and
        shape against meta.json; ``checksums=True`` additionally verifies the CRC-32 of
        every byte (reads the whole store). Raises :class:`TrajectoryStoreError` naming
        the first bad file.
        """
        indices = self.expert_indices()
        need = self.num_snapshots * self.num_params * 4
        for i in indices:
            path = self.expert_path(i)
            if path.stat().st_size < need:
                raise TrajectoryStoreError(
                    f"{path} is truncated ({path.stat().st_size} bytes, the data alone needs "
                    f"{need}); {_REGENERATE}"
                )
            if deep or checksums:
                self._load(i, mmap=True)
            if checksums:
                try:
                    with zipfile.ZipFile(path) as z:
                        bad = z.testzip()
                except (zipfile.BadZipFile, OSError) as e:
                    raise TrajectoryStoreError(f"{path} is corrupt ({e}); {_REGENERATE}") from e
                if bad is not None:
                    raise TrajectoryStoreError(
                        f"{path} is corrupt (checksum mismatch in {bad}); {_REGENERATE}"
                    )
        return indices

    # -------------------------------------------------------------------- models
    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model``'s parameter names/shapes differ from the store's spec."""
        diff = _spec_mismatch(self.spec, ParamSpec.of(model))
        if diff is not None:
            raise TrajectoryStoreError(
                f"model {type(model).__name__} does not match the trajectory store "
                f"{self.path} ({diff}); build it with store.build_model() or use a store "
                "trained for this architecture"
            )

    def build_model(self, **overrides: Any) -> nn.Module:
        """``build_model(**meta['model'], **overrides)``, checked against the store's spec."""
        from .models import build_model

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items()}
        kwargs.update(overrides)
        net = build_model(**kwargs)
        self.check_model(net)
        return net
