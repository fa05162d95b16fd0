"""What the modules that build their networks late (in ``configure_model``) share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_float32() -> Iterator[None]:
    """Build modules as eager construction does (on the CPU, in float32, initialised from
    the CPU generator) inside Lightning's ``configure_model`` contexts (the strategy's
    device, a true-precision default dtype); Lightning moves and converts them afterwards."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)
