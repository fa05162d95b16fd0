"""A small timm-style model registry (docs/design.md, section 'Decisions').

Every entry is a callable ``(channels, num_classes, image_size, **kw) -> nn.Module``
(usually a class), so a model is fully described by a config dict::

    cfg = {"name": "ConvNet", "channels": 3, "num_classes": 10, "image_size": 32, "depth": 3}
    model = build_model(**cfg)
    model.model_config  # the same dict, image_size normalised to [H, W]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any, TypeVar

from torch import nn

from ..errors import InputError

__all__ = ["build_model", "is_model", "list_models", "model_entrypoint", "register_model", "to_hw"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a model entrypoint under ``name`` (default: its ``__name__``).

    Use as ``@register_model`` or ``@register_model(name="MyNet")``. Re-registering a
    name raises ``ValueError``.
    """

    def decorator(f: F) -> F:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise InputError(f"register_model: model name {key!r} is already registered")
        _MODELS[key] = f
        return f

    return decorator(fn) if fn is not None else decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered callable for ``name``; ``ValueError`` listing known names if unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        hint = [k for k in _MODELS if k.lower() == str(name).lower()]
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise InputError(
            f"build_model: unknown model name {name!r}{did}; known models: {list_models()}"
        ) from None


def to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``image_size`` (an int or ``(H, W)``) to a tuple of two positive ints."""
    items = [image_size] * 2 if isinstance(image_size, Integral) else image_size
    try:
        items = list(items)
    except TypeError:
        items = []
    if (
        len(items) != 2
        or any(isinstance(s, bool) or not isinstance(s, Integral) for s in items)
        or min(items) < 1
    ):
        raise InputError(
            f"image_size must be a positive int or a pair (H, W) of positive ints, "
            f"got {image_size!r}"
        )
    return int(items[0]), int(items[1])


def _check_kwargs(name: str, fn: Callable[..., Any], kw: dict[str, Any]) -> None:
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    fixed = {"channels", "num_classes", "image_size"}
    accepted = [k for k in params if k not in fixed and k != "self"]
    unknown = sorted(k for k in kw if k not in params or k in fixed)
    if unknown:
        raise InputError(
            f"build_model: model {name!r} does not take keyword(s) {unknown}; "
            f"accepted keywords: {accepted}"
        )


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    **kw: Any,
) -> nn.Module:
    """Build the registered model ``name`` for ``channels`` x ``image_size`` inputs.

    Extra keywords go to the model (e.g. ``width``, ``depth``, ``norm`` for ConvNet).
    The returned module carries ``model_config``: a JSON-able dict such that
    ``build_model(**model.model_config)`` rebuilds the same architecture.
    """
    fn = model_entrypoint(name)
    hw = to_hw(image_size)
    _check_kwargs(name, fn, kw)
    model = fn(channels=int(channels), num_classes=int(num_classes), image_size=hw, **kw)
    model.model_config = {
        "name": name,
        "channels": int(channels),
        "num_classes": int(num_classes),
        "image_size": list(hw),
        **kw,
    }
    return model
