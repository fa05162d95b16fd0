"""Host-to-device copies that do not stall the GPU."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``. A CPU -> CUDA copy goes through page-locked memory with
    ``non_blocking=True``: a plain copy from pageable memory synchronises the stream (the
    host waits for all queued GPU work), which in a loop of small kernels serialises the
    Python side with the GPU. PyTorch's caching host allocator keeps the pinned block alive
    until the copy has run, so the result is safe to use at once on the current stream.
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
