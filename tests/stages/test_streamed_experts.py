"""Experts trained from prepared, streamed data (memory-mapped uint8, transformed per
batch) equal experts trained from the in-memory float32 splits, bit for bit: on
Fashion-MNIST in one process, and in a 2-process DDP run where each rank reads only its
share of the rows."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill import TrajectoryStore
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.datasets.loaders import FASHION_MNIST_SYSTEM_DIRS
from lightning_distill.data.prepared import RowFile
from lightning_distill.data.splits import HeldSplit, StreamedSplit
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.stages.experts import train_experts

from .test_experts_stage import ROOT, _env

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_SYSTEM_DIRS[0]).is_dir(),
    reason="Fashion-MNIST (apt-get install dataset-fashion-mnist) is not installed")


def _experts(tmp: Path, name: str, **data) -> tuple[TrajectoryStore, RealDataModule]:
    dm = RealDataModule("fashion_mnist", batch_size=256, **data)
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 4, "depth": 2},
                                   lr=0.01, dsa=True)
    trainer_kwargs = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=6,
                          limit_val_batches=2, enable_progress_bar=False,
                          enable_model_summary=False, logger=False)
    store = train_experts(model, dm, trainer_kwargs, store=str(tmp / name), num_experts=2,
                          seed=0)
    return store, dm


@needs_fashion_mnist
@pytest.mark.slow
def test_streamed_fashion_mnist_experts_equal_in_memory_experts(tmp_path):
    held_store, held = _experts(tmp_path, "held")
    streamed_store, streamed = _experts(tmp_path, "streamed", prepared=True, hold=False,
                                        prepared_root=str(tmp_path / "prepared"))
    assert isinstance(held.train_set, HeldSplit)
    assert isinstance(streamed.train_set, StreamedSplit)
    assert isinstance(streamed.real.train_data, RowFile)  # read by rows from disk
    for i in (0, 1):
        a = held_store.load_expert(i, mmap=False)
        b = streamed_store.load_expert(i, mmap=False)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert (a[-1] - a[0]).abs().max() > 1e-4
    # 2 experts x 2 epochs x 6 batches of 256 training rows, nothing more
    assert streamed.train_set.rows_read == 2 * 2 * 6 * 256
    assert held_store.input_space == streamed_store.input_space


@pytest.mark.slow
def test_ddp_ranks_read_only_their_share_of_prepared_data(tmp_path):
    """2 processes (gloo, CPU) on prepared digits: per expert each rank read
    epochs x ceil(n / 2) rows (its shard), and the trajectories equal the in-memory DDP
    run's."""
    script = Path(__file__).with_name("ddp_experts_script.py")
    runs = {}
    for kind, extra in (("memory", []), ("prepared", ["prepared"])):
        out = tmp_path / kind
        out.mkdir()
        proc = subprocess.run([sys.executable, str(script), str(out), "1", *extra], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[kind] = out
    assert (runs["prepared"] / "prepared").is_dir()
    memory = TrajectoryStore.open(runs["memory"] / "store")
    prepared = TrajectoryStore.open(runs["prepared"] / "store")
    for i in (0, 1):
        for a, b in zip(memory.load_expert(i, mmap=False), prepared.load_expert(i, mmap=False),
                        strict=True):
            assert torch.equal(a, b)
        for rank in (0, 1):
            saved = torch.load(runs["prepared"] / f"rank{rank}_expert{i}.pt")
            n = saved["train_size"]
            assert saved["rows_read"] == 2 * math.ceil(n / 2)  # 2 epochs, its half each
            assert torch.load(runs["memory"] / f"rank{rank}_expert{i}.pt")["rows_read"] == 0
