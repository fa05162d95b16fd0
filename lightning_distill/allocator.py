"""Keep freed CPU memory for reuse: glibc's allocator tuned for PyTorch's large tensors.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MB while it adapts
the threshold itself) with a fresh ``mmap`` and returns it to the system when freed. Every
such block then costs a page fault per 4 KB page at its first write. A training step on a
CPU frees and allocates activations of that size many times (a ConvNet-128 batch of 100
CIFAR images has 52 MB maps; a width-32 Fashion-MNIST batch of 256 has 33 MB), and the
recompute mode of the matching loss, which rebuilds each inner step's graph in its
backward, does so once more per step. Measured on 2 cores (benchmarks/RESULTS.md, 'Mixed
precision'), the page faults took a third to nearly a half of the time of an expert batch, an
evaluation run and a recompute distillation iteration.

:func:`reuse_freed_memory` raises the mmap threshold and the heap's trim threshold, so
that large blocks come from the heap and a freed block is reused by the next allocation
of its size instead of being unmapped; this is what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set from the environment, and what PyTorch's CPU performance
guide gets from jemalloc or tcmalloc. It changes no result (only where memory comes
from; tested bit for bit). The cost is memory: up to ``trim_threshold`` freed bytes stay
with the process instead of going back to the system, and blocks of many sizes fragment
the heap, so the peak resident memory grew by 8-33 % in the stages measured (docs/
design.md, 'CPU memory').

The ``lightning-distill`` command applies it in every stage that runs on a CPU
(:class:`~lightning_distill.cli.DistillTrainer`; ``LIGHTNING_DISTILL_REUSE_MEMORY=0``
turns it off); in a Trainer of your own, add the
:class:`~lightning_distill.callbacks.ReuseFreedMemory` callback or call the function.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from .errors import InputError

__all__ = ["DEFAULT_THRESHOLD", "ENV_SWITCH", "reuse_freed_memory", "reuse_freed_memory_on"]

#: the mmap and trim thresholds the command line sets (1 GiB; docs/design.md, 'CPU memory')
DEFAULT_THRESHOLD = 1 << 30

#: the environment variable that turns the CLI's default off ("0")
ENV_SWITCH = "LIGHTNING_DISTILL_REUSE_MEMORY"

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: tuple[int, int] | None = None


def reuse_freed_memory(mmap_threshold: int = DEFAULT_THRESHOLD,
                       trim_threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Let glibc's ``malloc`` serve blocks up to ``mmap_threshold`` bytes from the heap and
    keep up to ``trim_threshold`` freed bytes for reuse (process-wide, for the rest of the
    process). Returns True when the allocator took both settings; False where it is not
    glibc's (macOS, Windows, musl), which is left as it is. Calling it again with the same
    values does nothing.
    """
    global _applied
    if mmap_threshold <= 0 or trim_threshold <= 0:
        raise InputError("reuse_freed_memory: the thresholds are byte counts > 0, got "
                         f"mmap_threshold={mmap_threshold}, trim_threshold={trim_threshold}")
    if _applied == (mmap_threshold, trim_threshold):
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mmap first: setting either one stops glibc's own adaptation of the mmap threshold,
    # and a trim threshold alone would leave every block above 128 KB to mmap
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1))) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1))) == 1
    if ok:
        _applied = (mmap_threshold, trim_threshold)
    return ok


def reuse_freed_memory_on(device: torch.device | str) -> bool:
    """:func:`reuse_freed_memory` where ``device`` is a CPU and the environment does not
    say ``LIGHTNING_DISTILL_REUSE_MEMORY=0``; on a GPU the tensors are not malloc's."""
    if torch.device(device).type != "cpu" or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return reuse_freed_memory()
