"""The ConvNet's 2x2 / stride-2 average pool, fast on small CPU maps.

On a CPU, ``avg_pool2d`` of contiguous maps works plane by plane, which is slow for the
4x4 and 8x8 maps of the digits networks and of the last blocks of the 28x28 and 32x32
ones. :class:`AvgPool2x2` takes those maps (``CPU_MATMUL_POOL_PIXELS``) as one matrix
product with a fixed pooling matrix: the same value up to the order in which a window's
four terms are summed, and exactly the same gradient (each input's single term, scaled by
0.25). Everything else goes to ``avg_pool2d``. ``benchmarks/HISTORY.md`` has the
measurements ("Contiguous memory and matmul pooling", "The matmul pool in every ConvNet").
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CPU_MATMUL_POOL_PIXELS", "AvgPool2x2", "avg_pool_2x2"]

#: H x W of the CPU maps pooled as one matmul: 2-4x faster than ``avg_pool2d`` for 4x4
#: and 8x8 maps (forward + backward, 2 cores), even at 16x16, slower from 28x28.
CPU_MATMUL_POOL_PIXELS = (16, 64)


def avg_pool_2x2(h: Tensor) -> Tensor:
    """``F.avg_pool2d(h, 2)`` of ``h [..., C, H, W]``; small CPU maps as one matmul."""
    hh, ww = h.shape[-2:]
    lo, hi = CPU_MATMUL_POOL_PIXELS
    if h.device.type != "cpu" or not lo <= hh * ww <= hi or hh % 2 or ww % 2:
        return F.avg_pool2d(h, 2)
    lead = h.shape[:-2]
    flat = h.reshape(-1, hh * ww) @ _pool_matrix(hh, ww, h.dtype)
    return flat.view(*lead, hh // 2, ww // 2)


@functools.cache
def _pool_matrix(hh: int, ww: int, dtype: torch.dtype) -> Tensor:
    """``[H * W, H * W / 4]``, the 2x2 average pool as a matrix: row i is the pool of the
    i-th basis image."""
    basis = torch.eye(hh * ww, dtype=dtype).view(hh * ww, 1, hh, ww)
    return F.avg_pool2d(basis, 2).view(hh * ww, -1)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` computed by :func:`avg_pool_2x2` (an ``nn.AvgPool2d``, so
    code that inspects the layer sees the average pool it is)."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_2x2(x)
