"""The experts stage with ``group_size > 1``: the store equals the one-at-a-time store to
float32 rounding, resume of a partial group retrains only the missing members, shards
form their own groups, and a group that would not fit is refused before training."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_distill.callbacks import GSAM
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.functional import batched
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.stages.experts import train_experts
from lightning_distill.trajectories import TrajectoryStore


def _cfg(tmp: Path, name: str, group_size: int | None, num_experts: int = 4, **over):
    """(model, datamodule, trainer_kwargs, kwargs) of :func:`train_experts`: digits,
    ConvNet width 8 depth 2, 4 experts x 2 epochs, GSAM, batch 128."""
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 8, "depth": 2})
    trainer_kwargs = dict(accelerator="cpu", enable_progress_bar=False, max_epochs=2,
                          callbacks=[GSAM(rho=0.05, alpha=0.3)])
    kw = dict(store=str(tmp / name), log_dir=str(tmp / f"{name}_logs"), seed=0,
              num_experts=num_experts, group_size=group_size, **over)
    return model, RealDataModule("digits", batch_size=128), trainer_kwargs, kw


def _train(cfg) -> TrajectoryStore:
    model, dm, trainer_kwargs, kw = cfg
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_experts(model, dm, trainer_kwargs, **kw)
    finally:
        torch.set_num_threads(threads)


def _max_rel(a: TrajectoryStore, b: TrajectoryStore) -> float:
    assert a.expert_indices() == b.expert_indices()
    worst = 0.0
    for i in a.expert_indices():
        x, y = a.load_expert(i, mmap=False).double(), b.load_expert(i, mmap=False).double()
        assert not torch.equal(x[0], x[-1])  # trained
        assert torch.equal(x[0], y[0])  # the same initialisation, bit for bit
        worst = max(worst, float(((x - y).norm(dim=1) / x.norm(dim=1)).max()))
    return worst


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory) -> TrajectoryStore:
    return _train(_cfg(tmp_path_factory.mktemp("groups"), "single", group_size=1))


def test_a_group_store_equals_the_one_at_a_time_store(one_at_a_time, tmp_path):
    """Measured: max relative difference ~2e-8 (float32 rounding of batched kernels)."""
    grouped = _train(_cfg(tmp_path, "grouped", group_size=3))  # groups [0, 1, 2], [3]
    assert _max_rel(one_at_a_time, grouped) < 1e-5
    hp = grouped.hparams
    # the grouping does not change the experts: not recorded
    assert "group_size" not in hp and "group_size" not in hp["module"]
    assert hp == one_at_a_time.hparams


def test_resume_of_a_partial_group_retrains_only_the_missing_members(one_at_a_time, tmp_path):
    store_dir = tmp_path / "partial"
    shutil.copytree(one_at_a_time.path, store_dir)
    for i in (1, 3):
        (store_dir / f"expert_{i:05d}.pt").unlink()
    kept = {i: (store_dir / f"expert_{i:05d}.pt").stat().st_mtime_ns for i in (0, 2)}
    seen: list[list[int]] = []
    original = batched.check_group_memory

    def spy(net, shape, batch, members, device, **kw):
        seen.append(members)
        return original(net, shape, batch, members, device, **kw)

    import lightning_distill.stages.experts as stage

    stage.check_group_memory = spy
    try:
        store = _train(_cfg(tmp_path, "partial", group_size=4))
    finally:
        stage.check_group_memory = original
    assert seen == [2]  # one group of the two missing experts
    assert {i: (store_dir / f"expert_{i:05d}.pt").stat().st_mtime_ns for i in (0, 2)} == kept
    assert _max_rel(one_at_a_time, store) < 1e-5
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()}
    _train(_cfg(tmp_path, "partial", group_size=4))  # every member present: skipped
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()} == before


def test_shards_form_their_own_groups(one_at_a_time, tmp_path):
    s1 = _train(_cfg(tmp_path, "sharded", group_size=2, shard_index=1, num_shards=2))
    assert s1.expert_indices() == [1, 3]  # shard 1's group: experts 1 and 3
    s0 = _train(_cfg(tmp_path, "sharded", group_size=2, shard_index=0, num_shards=2))
    assert s0.expert_indices() == [0, 1, 2, 3]
    assert _max_rel(one_at_a_time, s0) < 1e-5


def test_a_group_that_would_not_fit_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(batched, "memory_budget", lambda device: 10_000)
    with pytest.raises(batched.GroupMemoryError, match="experts.group_size 4: 4 networks at "
                       "batch 128 need about .*MiB.*(use group_size|lower the batch size)"):
        _train(_cfg(tmp_path, "refused", group_size=4))
    assert TrajectoryStore.open(tmp_path / "refused").expert_indices() == []


def test_group_size_null_is_chosen_by_device_and_step_size(tmp_path, monkeypatch):
    """``experts.group_size: null`` (the default) asks auto_group_size for the device, the
    batch and the image size, as the evaluation protocol does; the groups follow it."""
    import lightning_distill.stages.experts as stage
    from lightning_distill.cli import DistillTrainer

    for fn in (train_experts, DistillTrainer.experts):
        assert inspect.signature(fn).parameters["group_size"].default is None
    asked, formed = [], []
    monkeypatch.setattr(stage, "auto_group_size",
                        lambda device, batch, shape: asked.append(
                            (torch.device(device).type, batch, tuple(shape))) or 2)
    monkeypatch.setattr(stage, "_train_group",
                        lambda plan, dm, store, group, *a, **k: formed.append(
                            (plan.group_size, list(group))))
    monkeypatch.setattr(stage, "_train_one",
                        lambda plan, dm, store, index, *a, **k: formed.append((1, [index])))
    _train(_cfg(tmp_path, "auto", group_size=None, num_experts=3))
    assert asked == [("cpu", 128, (8, 8))]
    assert formed == [(2, [0, 1]), (1, [2])]
    # on a CPU the rule itself: the digits experts group, Fashion-MNIST's batch 256 does not
    from lightning_distill.functional.evaluation import auto_group_size

    assert auto_group_size("cpu", 32, (8, 8)) == 8
    assert auto_group_size("cpu", 256, (28, 28)) == 1


class _Crash(Exception):
    pass


class _CrashInSecondEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise _Crash


def test_an_interrupted_group_resumes_from_its_epoch_checkpoint_bit_for_bit(tmp_path):
    """A group of 2 stopped as its second epoch starts leaves no expert file and its
    checkpoint after the first epoch; the rerun resumes there (network, optimizer, the
    recorder's snapshots, the members' DSA and data-order streams) and writes the
    experts an uninterrupted group run writes, bit for bit."""
    whole = _train(_cfg(tmp_path, "whole", group_size=2, num_experts=2))
    model, dm, trainer_kwargs, kw = _cfg(tmp_path, "cut", group_size=2, num_experts=2)
    trainer_kwargs["callbacks"] = [*trainer_kwargs["callbacks"], _CrashInSecondEpoch()]
    with pytest.raises(_Crash):
        _train((model, dm, trainer_kwargs, kw))
    partial = tmp_path / "cut" / ".partial" / "experts_00000-00001" / "last.ckpt"
    assert partial.is_file() and not list((tmp_path / "cut").glob("expert_*.pt"))
    assert torch.load(partial, weights_only=False)["epoch"] == 0
    resumed = _train(_cfg(tmp_path, "cut", group_size=2, num_experts=2))
    assert not partial.exists()
    for i in (0, 1):
        assert torch.equal(resumed.load_expert(i, mmap=False), whole.load_expert(i, mmap=False))
