"""Flat parameter vectors in ``named_parameters()`` order.

Trajectory stores and the matching loss treat a network's parameters as one flat
vector theta (docs/method.md, section 'Networks': conv.weight, conv.bias, norm.weight, norm.bias
per block, then fc.weight, fc.bias). These helpers convert between a module and
that vector, and build the ``{name: tensor}`` dict that
:func:`torch.func.functional_call` takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn

from ..errors import InputError


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a module's parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParamSpec:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector [P] into ``{name: view}`` (views share memory and autograd)."""
        if flat.dim() != 1 or flat.numel() != self.total:
            raise InputError(
                f"flat parameter vector has shape {tuple(flat.shape)}, expected [{self.total}]"
            )
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> ParamSpec:
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]))


def flatten_parameters(params: nn.Module | Iterable[Tensor]) -> Tensor:
    """Concatenate parameters (a module's, in ``named_parameters()`` order) into one vector.

    The result is a new tensor; gradients flow back to the inputs if they require grad.
    """
    if isinstance(params, nn.Module):
        params = [p for _, p in params.named_parameters()]
    flat = [p.reshape(-1) for p in params]
    return torch.cat(flat) if flat else torch.zeros(0)


def unflatten_parameters(flat: Tensor, module: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` views of ``flat`` shaped like ``module``'s parameters."""
    return ParamSpec.of(module).unflatten(flat)


@torch.no_grad()
def load_flat_parameters(module: nn.Module, flat: Tensor) -> nn.Module:
    """Copy a flat vector into ``module``'s parameters in place; returns the module."""
    views = ParamSpec.of(module).unflatten(flat).values()
    for p, v in zip(module.parameters(), views, strict=True):
        p.copy_(v)
    return module


def has_running_stats(module: nn.Module) -> bool:
    """True if any submodule keeps running statistics (BatchNorm with track_running_stats)."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for m in module.modules()
    )
