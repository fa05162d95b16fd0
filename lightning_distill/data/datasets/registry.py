"""The registry of real data sets: ``register_dataset``, ``get_dataset``, ``list_datasets``.

A loader is ``loader(root: Path, **kw) -> RealDataset``; names match case-insensitively,
ignoring ``-`` and ``_``. The packaged loaders register themselves in :mod:`.loaders`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import InputError
from .container import RealDataset

__all__ = ["DATA_ENV_VAR", "default_data_root", "get_dataset", "list_datasets", "register_dataset"]

DATA_ENV_VAR = "LIGHTNING_DISTILL_DATA"

Loader = Callable[..., RealDataset]
_REGISTRY: dict[str, Loader] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_dataset(name: str, loader: Loader | None = None) -> Any:
    """Register ``loader(root: Path, **kw) -> RealDataset`` under ``name``.

    Usable as a decorator (``@register_dataset("mine")``) or a call. Names match
    case-insensitively, ignoring ``-`` and ``_`` (``"CIFAR-10"`` finds ``cifar10``).
    """

    return register_in(_REGISTRY, "data set", name, loader)


def register_in(table: dict[str, Any], what: str, name: str, fn: Any = None) -> Any:
    """Add ``fn`` to ``table`` under ``name`` (a decorator when ``fn`` is None), refusing
    a name already there up to case, ``-`` and ``_``: the registration of data sets and of
    their sources (:func:`~.sources.register_source`)."""

    def deco(f: Any) -> Any:
        if _key(name) in {_key(k) for k in table}:
            raise InputError(f"a {what} named {name!r} is already registered")
        table[name] = f
        return f

    return deco(fn) if fn is not None else deco


def list_datasets() -> list[str]:
    """Registered data set names, sorted."""
    return sorted(_REGISTRY)


def default_data_root() -> Path:
    """``$LIGHTNING_DISTILL_DATA`` if set, else ``~/.cache/lightning_distill/data``."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_distill" / "data"


def get_dataset(name: str, root: str | os.PathLike | None = None, **kw: Any) -> RealDataset:
    """Load the registered data set ``name`` from ``root`` (default :func:`default_data_root`).

    Extra keywords go to the loader (e.g. ``download=True`` for the torchvision sets,
    ``image_size`` / ``channels`` for ``image_folder``).
    """
    matches = [k for k in _REGISTRY if _key(k) == _key(name)]
    if not matches:
        raise InputError(f"unknown data set {name!r}; registered: {', '.join(list_datasets())}")
    path = Path(root).expanduser() if root is not None else default_data_root()
    return _REGISTRY[matches[0]](path, **kw)
