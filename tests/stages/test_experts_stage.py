"""`lightning-distill experts` (train_experts): reproducibility, resume after SIGKILL,
sharding, two-process DDP, and the expert recipes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill.config import DataConfig, ModelConfig, TrainerConfig
from lightning_distill.io import is_temp_file
from lightning_distill.stages.experts import (
    ExpertsConfig,
    ExpertTrainingConfig,
    SharpnessConfig,
    expert_seeds,
    train_experts,
)
from lightning_distill.trajectories import TrajectoryStore

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, name: str, group_size: int = 1, **over) -> ExpertsConfig:
    """Digits, ConvNet width 8 depth 2 (1026 parameters), 2 experts x 2 epochs, GSAM;
    one at a time unless ``group_size`` (the bit-identity tests below are about that
    path; tests/stages/test_experts_groups.py covers groups)."""
    cfg = ExpertsConfig(
        data=DataConfig(name="digits", batch_size=256),
        model=ModelConfig("ConvNet", {"width": 8, "depth": 2}),
        experts=ExpertTrainingConfig(num_experts=2, epochs=2, group_size=group_size),
        sharpness=SharpnessConfig("gsam", rho=0.05, alpha=0.3),
        trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
        store=str(tmp / name),
        log_dir=str(tmp / f"{name}_logs"),
        seed=0,
    )
    return dataclasses.replace(cfg, **over)


def _train(cfg: ExpertsConfig, **kw) -> TrajectoryStore:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reduction order as the subprocesses
    try:
        return train_experts(cfg, **kw)
    finally:
        torch.set_num_threads(threads)


def _assert_same_store(a: TrajectoryStore, b: TrajectoryStore) -> None:
    assert a.expert_indices() == b.expert_indices()
    for i in a.expert_indices():
        assert torch.equal(a.load_expert(i, mmap=False), b.load_expert(i, mmap=False)), i


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "PL_GLOBAL_SEED"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, TrajectoryStore]:
    tmp = tmp_path_factory.mktemp("experts_ref")
    return tmp, _train(_cfg(tmp, "ref"))


def test_reference_store_holds_trained_gsam_experts(reference):
    _, store = reference
    assert store.expert_indices() == [0, 1]
    assert store.num_snapshots == 3 and store.num_params == 1026
    e0, e1 = store.load_expert(0), store.load_expert(1)
    assert e0.shape == (3, 1026)
    assert (e0[2] - e0[0]).abs().max() > 1e-3  # the expert trained
    assert not torch.equal(e0[0], e1[0])  # independent initialisations
    hp = store.hparams
    assert hp["seed"] == 0 and hp["sharpness"] == {"method": "gsam", "rho": 0.05, "alpha": 0.3}
    assert store.model == {"name": "ConvNet", "channels": 1, "num_classes": 10,
                           "image_size": [8, 8], "width": 8, "depth": 2}


def test_expert_seeds_depend_only_on_seed_and_index():
    s = expert_seeds(0, 1)
    assert s == expert_seeds(0, 1)
    assert len(set(s.values())) == 3
    assert s != expert_seeds(0, 2) and s != expert_seeds(1, 1)


def test_same_seed_gives_bit_identical_store(reference, tmp_path):
    _, ref = reference
    again = _train(_cfg(tmp_path, "again"))
    _assert_same_store(again, ref)


def test_different_seed_gives_different_experts(reference, tmp_path):
    _, ref = reference
    other = _train(_cfg(tmp_path, "seed1", seed=1,
                        experts=ExpertTrainingConfig(num_experts=1, epochs=2, group_size=1)))
    a, b = other.load_expert(0), ref.load_expert(0)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[-1], b[-1])


def test_shards_train_disjoint_experts_that_equal_the_unsharded_store(reference, tmp_path):
    _, ref = reference
    s1 = _train(_cfg(tmp_path, "sharded", shard_index=1, num_shards=2))
    assert s1.expert_indices() == [1]  # shard 1 of 2 trains expert 1 only
    s0 = _train(_cfg(tmp_path, "sharded", shard_index=0, num_shards=2))
    assert s0.expert_indices() == [0, 1]
    _assert_same_store(s0, ref)


def test_rerun_trains_only_missing_experts(reference, tmp_path):
    ref_dir, ref = reference
    shutil.copytree(ref_dir / "ref", tmp_path / "partial")
    (tmp_path / "partial" / "expert_00000.pt").unlink()
    kept = (tmp_path / "partial" / "expert_00001.pt").stat().st_mtime_ns
    store = _train(_cfg(tmp_path, "partial"))
    assert (tmp_path / "partial" / "expert_00001.pt").stat().st_mtime_ns == kept
    _assert_same_store(store, ref)
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()}
    _train(_cfg(tmp_path, "partial"))  # complete: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()} == before


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="shard_index"):
        train_experts(_cfg(tmp_path, "x", shard_index=2, num_shards=2))
    with pytest.raises(ValueError, match="sharpness.method"):
        train_experts(_cfg(tmp_path, "x", sharpness=SharpnessConfig("gsamm")))
    assert not (tmp_path / "x").exists()


class _FakeStrategy:
    def __init__(self, rank0_plan):
        self.rank0_plan = rank0_plan

    def broadcast(self, obj, src=0):
        return self.rank0_plan

    def reduce_boolean_decision(self, decision, all=True):
        return decision  # this rank's vote decides in the fake


class _FakeTrainer:
    def __init__(self, rank0_plan, world_size=2):
        self.strategy, self.world_size, self.global_rank = _FakeStrategy(rank0_plan), world_size, 1


def test_rank_guard_fails_when_ranks_disagree_on_the_experts():
    from lightning_distill.callbacks.same_expert import SameExpertOnAllRanks

    guard = SameExpertOnAllRanks(1, [2, 3])
    guard.setup(_FakeTrainer([1, 2, 3]), None, "fit")  # agreement: nothing happens
    guard.setup(_FakeTrainer([0, 1, 2, 3], world_size=1), None, "fit")  # single process
    with pytest.raises(RuntimeError, match="disagree.*shared by all nodes"):
        guard.setup(_FakeTrainer([0, 1, 2, 3]), None, "fit")


# ------------------------------------------------------------------ kill and resume
_DRIVER = """
import functools, sys, time
from pytorch_lightning.callbacks import Callback
import lightning_distill.stages.experts as stage
from lightning_distill.cli import main

class HangInSecondExpert(Callback):
    # after the recorder has taken expert 1's first-epoch snapshot: signal, then hang
    def on_train_epoch_end(self, trainer, pl_module):
        open(sys.argv[1], "w").close()
        time.sleep(600)

stage.train_experts = functools.partial(
    stage.train_experts, callbacks=lambda i: [HangInSecondExpert()] if i == 1 else [])
sys.exit(main(sys.argv[2:]))
"""


def _write_yaml(cfg: ExpertsConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)), encoding="utf-8")
    return path


@pytest.mark.slow
def test_killed_run_leaves_no_partial_file_and_rerun_completes_the_store(reference, tmp_path):
    pytest.importorskip("jsonargparse")  # the CLI (not on the GPU image)
    _, ref = reference
    cfg = _cfg(tmp_path, "killed")
    config = _write_yaml(cfg, tmp_path / "experts.yaml")
    marker = tmp_path / "expert1_training"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(marker), "experts", "--config", str(config)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 150
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"driver ended or timed out:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.05)
        store_dir = Path(cfg.store)
        assert (store_dir / "expert_00000.pt").is_file()  # expert 0 finished
        proc.send_signal(signal.SIGKILL)  # mid-expert 1, snapshots held in memory
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in store_dir.iterdir())
    assert names == ["expert_00000.pt", "meta.json"], names
    assert not any(is_temp_file(p) or "partial" in p.name for p in store_dir.iterdir())

    rerun = subprocess.run(
        [sys.executable, "-m", "lightning_distill.cli", "experts", "--config", str(config)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Training 1 expert(s)" in rerun.stdout
    assert sorted(p.name for p in store_dir.iterdir()) == [
        "expert_00000.pt", "expert_00001.pt", "meta.json"]
    _assert_same_store(TrajectoryStore.open(store_dir), ref)


# ------------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.parametrize("group_size", [1, 2], ids=["one_at_a_time", "group_of_2"])
def test_ddp_two_processes_write_one_store_with_identical_ranks(tmp_path, group_size):
    """Both ranks hold the same parameters after every expert (DDP averages the
    gradients, per member for a group) and rank 0's store holds them."""
    script = Path(__file__).with_name("ddp_experts_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(group_size)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "done_rank0").exists() and (tmp_path / "done_rank1").exists()
    store = TrajectoryStore.open(tmp_path / "store")
    assert store.expert_indices() == [0, 1]
    for i in (0, 1):
        r0 = torch.load(tmp_path / f"rank0_expert{i}.pt")
        r1 = torch.load(tmp_path / f"rank1_expert{i}.pt")
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["global_step"] == r1["global_step"] > 0
        assert torch.equal(r0["final"], r1["final"])  # GSAM kept the ranks in step
        snaps = store.load_expert(i, mmap=False)
        assert torch.equal(snaps[-1], r0["final"])
        assert (snaps[-1] - snaps[0]).abs().max() > 1e-3
    assert not torch.equal(store.load_expert(0)[0], store.load_expert(1)[0])


# ----------------------------------------------------------------------- recipes
RECIPES = sorted((ROOT / "recipes").glob("*/experts.yaml"))


def _parse_recipe(path: Path) -> ExpertsConfig:
    from lightning_distill.cli import parse_config

    name, cfg = parse_config(["experts", "--config", str(path)])
    assert name == "experts"
    return cfg


@pytest.mark.parametrize("path", RECIPES, ids=[p.parent.name for p in RECIPES])
def test_every_experts_recipe_parses(path):
    cfg = _parse_recipe(path)
    assert isinstance(cfg, ExpertsConfig)
    assert isinstance(cfg.experts, ExpertTrainingConfig)
    assert cfg.data.name == path.parent.name
    assert cfg.experts.num_experts >= 1 and cfg.experts.epochs >= 1
    assert cfg.sharpness.method in ("none", "sam", "asam", "gsam")


def test_recipes_exist_for_the_five_datasets():
    assert {p.parent.name for p in RECIPES} >= {
        "digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"}


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet"])
def test_cifar_and_tiny_recipes_hold_the_published_settings(name):
    cfg = _parse_recipe(ROOT / "recipes" / name / "experts.yaml")
    ex = cfg.experts
    assert (ex.num_experts, ex.epochs) == (100, 100)
    assert (ex.lr, ex.momentum, ex.weight_decay, ex.dsa) == (0.01, 0.0, 0.0, True)
    assert cfg.data.batch_size == 256
    assert (cfg.sharpness.method, cfg.sharpness.rho, cfg.sharpness.alpha) == ("gsam", 0.01, 0.3)
    # every DATM config, TinyImageNet's included, sets zca: True
    assert cfg.data.zca is True
    assert cfg.model.name == ("ConvNetD4" if name == "tiny_imagenet" else "ConvNet")
