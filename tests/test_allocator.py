"""lightning_distill.allocator / ReuseFreedMemory: large blocks come from the heap, which
keeps freed memory for reuse; results are unchanged bit for bit; the CLI's Trainer and the
callback apply it on a CPU only. (Its speed: benchmarks/precision.py.)"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import pytorch_lightning as pl
import torch

from lightning_distill import allocator
from lightning_distill.callbacks import ReuseFreedMemory
from lightning_distill.cli import DistillTrainer
from lightning_distill.errors import InputError

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _python(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAP = """
    import json, torch
    from lightning_distill.allocator import reuse_freed_memory
    applied = reuse_freed_memory() if {tune} else False
    x = torch.ones(64 * 2**20 // 4)  # 64 MB: above what glibc ever serves from its heap
    heap = next(line.split()[0] for line in open("/proc/self/maps") if "[heap]" in line)
    lo, hi = (int(a, 16) for a in heap.split("-"))
    print(json.dumps({{"applied": applied, "in_heap": lo <= x.data_ptr() < hi}}))
"""


@glibc
def test_large_tensors_come_from_the_heap_where_freed_blocks_are_kept():
    """By default a 64 MB block is a fresh mmap (unmapped when freed, its pages faulted
    in again at the next allocation); tuned, it comes from the heap, which keeps what is
    freed (1 GiB) for the next allocation."""
    default = _python(HEAP.format(tune=False))
    tuned = _python(HEAP.format(tune=True))
    assert default == {"applied": False, "in_heap": False}
    assert tuned == {"applied": True, "in_heap": True}


UNROLL = """
    import json, torch
    from lightning_distill.allocator import reuse_freed_memory
    from lightning_distill.functional import sample_minibatches, trajectory_matching_loss
    from lightning_distill.models import build_model, flatten_parameters
    applied = reuse_freed_memory() if {tune} else False
    torch.manual_seed(0)
    model = build_model("ConvNet", channels=3, num_classes=4, image_size=32, width=32,
                        depth=2)
    start = flatten_parameters(model).detach()
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(64, 3, 32, 32, requires_grad=True)  # 8 MB maps per step
    labels = torch.randn(64, 4, requires_grad=True)
    syn_lr = torch.tensor(0.01, requires_grad=True)
    batches = sample_minibatches(64, 64, 3, torch.Generator().manual_seed(1))
    out = {{"applied": applied}}
    for mode in ("full", "recompute"):
        for t in (images, labels, syn_lr):
            t.grad = None
        loss = trajectory_matching_loss(model, start, target, images, labels, syn_lr,
                                        batches, None, mode)
        loss.backward()
        out[mode] = [loss.item()] + [t.grad.double().sum().item() for t in
                                     (images, labels, syn_lr)] + [
            images.grad.abs().double().sum().item()]
    print(json.dumps(out))
"""


@glibc
def test_results_are_bit_identical_with_the_tuned_allocator():
    default = _python(UNROLL.format(tune=False))
    tuned = _python(UNROLL.format(tune=True))
    assert tuned.pop("applied") and not default.pop("applied")
    assert tuned == default  # exact floats, through JSON's repr


def test_thresholds_must_be_positive():
    with pytest.raises(InputError, match="mmap_threshold=0"):
        allocator.reuse_freed_memory(mmap_threshold=0)


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple] = []

    def record(*args):
        seen.append(args)
        return True

    monkeypatch.setattr(allocator, "reuse_freed_memory", record)
    monkeypatch.setattr("lightning_distill.callbacks.memory.reuse_freed_memory", record)
    return seen


def test_the_cli_trainer_applies_it_on_a_cpu_unless_switched_off(calls, monkeypatch):
    DistillTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert calls == [()]
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    DistillTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert calls == [()]
    assert not allocator.reuse_freed_memory_on("cpu")
    monkeypatch.delenv(allocator.ENV_SWITCH)
    assert not allocator.reuse_freed_memory_on(torch.device("meta"))  # not a CPU
    assert calls == [()]


def test_the_callback_applies_its_thresholds_at_setup(calls):
    cb = ReuseFreedMemory(mmap_threshold=2**28, trim_threshold=2**29)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[cb])
    cb.setup(trainer, pl.LightningModule(), "fit")
    assert calls == [(2**28, 2**29)] and cb.applied
