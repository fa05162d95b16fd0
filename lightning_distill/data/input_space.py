"""InputSpace: the identity of the space a model's inputs live in.

Experts, distillation and evaluation must all see images transformed the same way:
normalised with the same per-channel statistics, or whitened with the same fitted ZCA
(docs/method.md, section 'ZCA whitening and normalisation'). An :class:`InputSpace`
records which: the data set, the normalisation kind, its mean/std or the ZCA fingerprint
and regularisation. It is written into trajectory stores (``meta.json``) and synthetic
sets (``meta``) as a plain dict (:meth:`InputSpace.to_dict`, docs/formats.md, section
'Input space') and read back with :meth:`InputSpace.from_dict`, which also reads the dicts
of files written before this type existed.

One rule says whether two spaces are compatible (:meth:`InputSpace.matches`): they match
unless a field is given (not None) on both sides with different values; ``mean`` and
``std`` compare numerically (relative tolerance 1e-5). Keys other than the six known
fields (files written by other tools) are kept and compared the same way.

An InputSpace is also a read-only mapping of its dict form, so code that treated the
old dicts as dicts (``space["normalization"]``, ``dict(space)``, ``space == {...}``)
keeps working.

Example::

    space = InputSpace.meanstd("cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    space.to_dict()["normalization"]                  # "meanstd"
    InputSpace.from_dict(store.meta["input_space"]).matches(space)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import InputError

__all__ = ["InputSpace"]

#: the known fields, in the order they are written and compared
_FIELDS = ("dataset", "normalization", "mean", "std", "zca_fingerprint", "zca_regularization")
_STATS = ("mean", "std")
_RTOL, _ATOL = 1e-5, 1e-8


def _floats(value: Any, key: str) -> tuple[float, ...]:
    if hasattr(value, "tolist"):  # tensors, numpy arrays
        value = value.tolist()
    if isinstance(value, (int, float)):
        value = [value]
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise InputError(f"input space: {key} must be a list of numbers, got {value!r}") from e


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=_RTOL, abs_tol=_ATOL) for x, y in zip(a, b, strict=True)
    )


@dataclass(frozen=True, eq=False, repr=False)
class InputSpace(Mapping):
    """The input space of a model: data set, normalisation statistics or ZCA fingerprint.

    Args:
        dataset: the registered data set name.
        normalization: ``"meanstd"`` or ``"zca"`` (None: unknown).
        mean, std: per-channel statistics of ``"meanstd"``.
        zca_fingerprint, zca_regularization: identity of the fitted ZCA of ``"zca"``.
        extra: other keys of a dict read with :meth:`from_dict`, as sorted (key, value)
            pairs, written back unchanged.

    ``InputSpace()`` (every field None) is the unknown space: it matches every space
    and its dict form is ``{}``.
    """

    dataset: str | None = None
    normalization: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    zca_fingerprint: str | None = None
    zca_regularization: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for key in _STATS:
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _floats(value, key))
        for key in ("dataset", "normalization", "zca_fingerprint"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise InputError(f"input space: {key} must be a string, got {value!r}")
        if self.zca_regularization is not None:
            object.__setattr__(self, "zca_regularization", float(self.zca_regularization))
        extra = tuple(sorted((str(k), v) for k, v in dict(self.extra).items()))
        clash = [k for k, _ in extra if k in _FIELDS]
        if clash:
            raise InputError(f"input space: extra keys {clash} are known fields")
        object.__setattr__(self, "extra", extra)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def meanstd(cls, dataset: str, mean: Sequence[float], std: Sequence[float]) -> InputSpace:
        """Per-channel ``(x - mean) / std`` of data set ``dataset``."""
        return cls(dataset=dataset, normalization="meanstd", mean=tuple(mean), std=tuple(std))

    @classmethod
    def zca(cls, dataset: str, fingerprint: str, regularization: float) -> InputSpace:
        """ZCA whitening of data set ``dataset`` with the fit named by ``fingerprint``."""
        return cls(dataset=dataset, normalization="zca", zca_fingerprint=fingerprint,
                   zca_regularization=regularization)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InputSpace:
        """Read the dict form (``None`` or ``{}``: the unknown space). Missing keys and
        None values mean "not recorded"; unknown keys are kept in ``extra``."""
        if isinstance(data, InputSpace):
            return data
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise InputError(f"input space must be a dict, got {type(data).__name__}")
        known = {k: data[k] for k in _FIELDS if k in data}
        extra = tuple((str(k), v) for k, v in data.items() if k not in _FIELDS)
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls, value: InputSpace | Mapping[str, Any] | None) -> InputSpace:
        """``value`` as an InputSpace (an InputSpace, its dict form, or None)."""
        return cls.from_dict(value)

    # ------------------------------------------------------------------ dict form
    def to_dict(self) -> dict[str, Any]:
        """The dict written to files: the six known keys (None where not recorded) and
        the extra keys; ``{}`` plus the extra keys when nothing is known."""
        out: dict[str, Any] = {}
        if any(getattr(self, k) is not None for k in _FIELDS):
            for k in _FIELDS:
                v = getattr(self, k)
                out[k] = list(v) if k in _STATS and v is not None else v
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @property
    def known(self) -> bool:
        """False for the unknown space (nothing recorded)."""
        return bool(self.to_dict())

    # ------------------------------------------------------------------ comparison
    def _items(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _FIELDS}, **dict(self.extra)}

    def mismatch(self, other: InputSpace | Mapping[str, Any] | None) -> str | None:
        """The first field given on both sides with different values, as
        ``"key = <this value> vs <other value>"``; None when the spaces match."""
        mine, theirs = self._items(), InputSpace.coerce(other)._items()
        for key in [*_FIELDS, *sorted((set(mine) | set(theirs)) - set(_FIELDS))]:
            a, b = mine.get(key), theirs.get(key)
            if a is None or b is None:
                continue
            if key in _STATS:
                if not _close(a, b):
                    return f"{key} = {list(a)!r} vs {list(b)!r}"
            elif a != b:
                return f"{key} = {a!r} vs {b!r}"
        return None

    def matches(self, other: InputSpace | Mapping[str, Any] | None) -> bool:
        """True unless a field is given on both sides with different values (``mean`` and
        ``std`` compare with a relative tolerance of 1e-5): the one rule by which data,
        trajectory stores and synthetic sets are checked against each other."""
        return self.mismatch(other) is None

    def __eq__(self, other: object) -> bool:
        """Equal fields (exact); a dict compares as :meth:`from_dict` reads it."""
        if isinstance(other, Mapping) and not isinstance(other, InputSpace):
            try:
                other = InputSpace.from_dict(other)
            except ValueError:
                return False
        if not isinstance(other, InputSpace):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=repr))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._items().items() if v is not None)
        return f"InputSpace({shown})"
