"""`lightning-distill experts` (train_experts): reproducibility, resume after SIGKILL,
sharding, two-process DDP, and the expert recipes."""

from __future__ import annotations

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

from lightning_distill.callbacks import GSAM, PADDataSelection
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.io import is_temp_file
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.stages.experts import expert_seeds, train_experts
from lightning_distill.trajectories import TrajectoryStore

ROOT = Path(__file__).resolve().parents[2]


def _args(tmp: Path, name: str, group_size: int = 1, *, num_experts: int = 2, epochs: int = 2,
          callbacks: tuple = (), data: dict | None = None, **over):
    """(model, datamodule, trainer_kwargs, kwargs) of :func:`train_experts`: digits,
    ConvNet width 8 depth 2 (1026 parameters), 2 experts x 2 epochs, GSAM; one at a time
    unless ``group_size`` (the bit-identity tests below are about that path;
    tests/stages/test_experts_groups.py covers groups)."""
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 8, "depth": 2})
    dm = RealDataModule(**{"name": "digits", "batch_size": 256, **(data or {})})
    trainer_kwargs = dict(accelerator="cpu", enable_progress_bar=False, max_epochs=epochs,
                          callbacks=[GSAM(rho=0.05, alpha=0.3), *callbacks])
    kw = dict(store=str(tmp / name), log_dir=str(tmp / f"{name}_logs"),
              num_experts=num_experts, group_size=group_size, seed=0)
    kw.update(over)
    return model, dm, trainer_kwargs, kw


def _train(tmp: Path, name: str, group_size: int = 1, **over) -> TrajectoryStore:
    model, dm, trainer_kwargs, kw = _args(tmp, name, group_size, **over)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reduction order as the subprocesses
    try:
        return train_experts(model, dm, trainer_kwargs, **kw)
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
    return tmp, _train(tmp, "ref")


def test_reference_store_holds_trained_gsam_experts(reference):
    _, store = reference
    assert store.expert_indices() == [0, 1]
    assert store.num_snapshots == 3 and store.num_params == 1026
    e0, e1 = store.load_expert(0), store.load_expert(1)
    assert e0.shape == (3, 1026)
    assert (e0[2] - e0[0]).abs().max() > 1e-3  # the expert trained
    assert not torch.equal(e0[0], e1[0])  # independent initialisations
    hp = store.hparams
    assert hp["seed"] == 0 and hp["num_experts"] == 2 and hp["epochs"] == 2
    assert hp["batch_size"] == 256 and hp["module"]["lr"] == 0.01 and hp["module"]["dsa"]
    assert "model" not in hp["module"]  # the architecture is the store's own `model`
    assert hp["sharpness"] == {"method": "gsam", "rho": 0.05, "alpha": 0.3, "adaptive": True}
    assert "data_selection" not in hp
    assert store.model == {"name": "ConvNet", "channels": 1, "num_classes": 10,
                           "image_size": [8, 8], "width": 8, "depth": 2}


def test_expert_seeds_depend_only_on_seed_and_index():
    s = expert_seeds(0, 1)
    assert s == expert_seeds(0, 1)
    assert len(set(s.values())) == 3
    assert s != expert_seeds(0, 2) and s != expert_seeds(1, 1)


def test_same_seed_gives_bit_identical_store(reference, tmp_path):
    _, ref = reference
    again = _train(tmp_path, "again")
    _assert_same_store(again, ref)


def test_different_seed_gives_different_experts(reference, tmp_path):
    _, ref = reference
    other = _train(tmp_path, "seed1", seed=1, num_experts=1)
    a, b = other.load_expert(0), ref.load_expert(0)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[-1], b[-1])


def test_shards_train_disjoint_experts_that_equal_the_unsharded_store(reference, tmp_path):
    _, ref = reference
    s1 = _train(tmp_path, "sharded", shard_index=1, num_shards=2)
    assert s1.expert_indices() == [1]  # shard 1 of 2 trains expert 1 only
    s0 = _train(tmp_path, "sharded", shard_index=0, num_shards=2)
    assert s0.expert_indices() == [0, 1]
    _assert_same_store(s0, ref)


def test_rerun_trains_only_missing_experts(reference, tmp_path):
    ref_dir, ref = reference
    shutil.copytree(ref_dir / "ref", tmp_path / "partial")
    (tmp_path / "partial" / "expert_00000.pt").unlink()
    kept = (tmp_path / "partial" / "expert_00001.pt").stat().st_mtime_ns
    store = _train(tmp_path, "partial")
    assert (tmp_path / "partial" / "expert_00001.pt").stat().st_mtime_ns == kept
    _assert_same_store(store, ref)
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()}
    _train(tmp_path, "partial")  # complete: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()} == before


def test_bad_settings_fail_before_training(tmp_path):
    from lightning_distill.errors import InputError

    model, dm, trainer_kwargs, kw = _args(tmp_path, "x", shard_index=2, num_shards=2)
    with pytest.raises(InputError, match="shard_index"):
        train_experts(model, dm, trainer_kwargs, **kw)
    assert not (tmp_path / "x").exists()


def test_an_unknown_sharpness_callback_is_one_error_line_naming_it(tmp_path, capsys):
    from lightning_distill.cli import main

    # a sharpness method that does not exist: the CLI refuses the callback in one line
    recipe = _write_yaml(tmp_path, "x", tmp_path / "x.yaml")
    text = recipe.read_text(encoding="utf-8").replace("callbacks.GSAM", "callbacks.GSAMM")
    recipe.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert main(["experts", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-distill experts: error:") and "\n" not in err
    assert "GSAMM" in err
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
import sys, time
from pytorch_lightning.callbacks import Callback
import lightning_distill.stages.experts as stage
from lightning_distill.cli import main

class HangInSecondExpert(Callback):
    # as expert 1's second epoch starts (its first epoch's snapshot taken and its epoch
    # checkpoint written): signal, then hang
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            open(sys.argv[1], "w").close()
            time.sleep(600)

run_experts = stage.run_experts

def hang_in_expert_1(plan, dm):
    make_trainer = plan.make_trainer

    def with_hang(cbs, version, first):
        hang = [HangInSecondExpert()] if version == "expert_00001" else []
        return make_trainer([*cbs, *hang], version, first)

    plan.make_trainer = with_hang
    return run_experts(plan, dm)

stage.run_experts = hang_in_expert_1
sys.exit(main(sys.argv[2:]))
"""


def _write_yaml(tmp: Path, name: str, path: Path) -> Path:
    """The settings of :func:`_args` as an ``experts`` recipe (the LightningCLI format)."""
    recipe = {
        "seed_everything": 0, "store": str(tmp / name), "log_dir": str(tmp / f"{name}_logs"),
        "num_experts": 2, "group_size": 1, "seed": 0,
        "model": {"model": "ConvNet", "model_kwargs": {"width": 8, "depth": 2}},
        "data": {"name": "digits", "batch_size": 256},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "max_epochs": 2,
                    "callbacks": [{"class_path": "lightning_distill.callbacks.GSAM",
                                   "init_args": {"rho": 0.05, "alpha": 0.3}}]},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.slow
def test_killed_run_resumes_the_interrupted_expert_from_its_epoch_checkpoint(reference,
                                                                             tmp_path):
    """Killed in expert 1's second epoch: the store holds expert 0 and no partial expert
    file, ``.partial/expert_00001/last.ckpt`` holds its first epoch; the rerun resumes
    expert 1 from there and the store equals an uninterrupted run's, bit for bit."""
    pytest.importorskip("jsonargparse")  # the CLI (not on the GPU image)
    _, ref = reference
    config = _write_yaml(tmp_path, "killed", tmp_path / "experts.yaml")
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
        store_dir = tmp_path / "killed"
        assert (store_dir / "expert_00000.pt").is_file()  # expert 0 finished
        proc.send_signal(signal.SIGKILL)  # mid-expert 1, snapshots held in memory
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in store_dir.iterdir())
    assert names == [".partial", "expert_00000.pt", "meta.json"], names
    assert not any(is_temp_file(p) for p in store_dir.iterdir())
    assert sorted(p.name for p in (store_dir / ".partial").iterdir()) == ["expert_00001"]
    last = store_dir / ".partial" / "expert_00001" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # after the first epoch

    rerun = subprocess.run(
        [sys.executable, "-m", "lightning_distill.cli", "experts", "--config", str(config)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Training 1 expert(s)" in rerun.stdout
    assert "expert_00001: resuming from" in " ".join(rerun.stdout.split())
    assert "Restoring states from the checkpoint path" in rerun.stderr + rerun.stdout
    assert sorted(p.name for p in store_dir.iterdir()) == [
        ".partial", "expert_00000.pt", "expert_00001.pt", "meta.json"]
    assert list((store_dir / ".partial").iterdir()) == []  # removed once written
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
        # train/loss_epoch, logged at the epoch's end from a MeanMetric: the same on both
        # ranks, the batch-weighted mean of both ranks' step losses of the last epoch
        last = max(r0["losses"])
        steps = r0["losses"][last] + r1["losses"][last]
        mean = sum(loss * b for loss, b in steps) / sum(b for _, b in steps)
        assert r0["loss_epoch"] == r1["loss_epoch"] == pytest.approx(mean, rel=1e-6)
        assert r0["losses"][last] != r1["losses"][last]  # the ranks saw different batches
    assert not torch.equal(store.load_expert(0)[0], store.load_expert(1)[0])


@pytest.mark.slow
def test_ddp_with_data_selection_shards_each_epochs_subset(tmp_path):
    """Two ranks with PAD selection: the ranks stay identical, and per epoch their rows are
    the two DistributedSampler-style shards of exactly that epoch's subset."""
    import math

    from lightning_distill.difficulty import DIFFICULTY_FILE
    from lightning_distill.functional import PADSelection

    script = Path(__file__).with_name("ddp_experts_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "pad"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = TrajectoryStore.open(tmp_path / "store")
    assert store.expert_indices() == [0, 1] and store.hparams["data_selection"]["score"] == "el2n"
    saved = torch.load(store.path / DIFFICULTY_FILE, weights_only=True)
    ds = store.hparams["data_selection"]
    schedule = PADDataSelection(**{k: ds[k] for k in ("initial_ratio", "add_end_epoch",
                                                      "remove_epochs", "remove_ratios")}).schedule
    dm = RealDataModule("digits", batch_size=128)
    dm.setup("fit")
    select = PADSelection(saved["scores"], dm.train_set.tensors[1], schedule, 10)
    for i in (0, 1):
        r0 = torch.load(tmp_path / f"rank0_expert{i}.pt")
        r1 = torch.load(tmp_path / f"rank1_expert{i}.pt")
        assert torch.equal(r0["final"], r1["final"])
        assert torch.equal(store.load_expert(i, mmap=False)[-1], r0["final"])
        for e in range(2):
            subset = select(e).tolist()
            a, b = r0["rows"][e], r1["rows"][e]
            assert len(a) == len(b) == math.ceil(len(subset) / 2)
            assert set(a) | set(b) == set(subset)  # padded by wrapping: <= 1 repeat
        assert len(r0["rows"][0]) < len(r0["rows"][1])  # epoch 0: half of each class


# --------------------------------------------------------------- data selection (PAD)
#: two scoring networks x 1 epoch; IR 0.5, AEE 1 and the easiest quarter dropped after
#: epoch 1: of 2 epochs, epoch 0 trains on half of each class and epoch 1 on all
PAD = dict(num_models=2, score_epochs=1, score_lr=0.05, initial_ratio=0.5, add_end_epoch=1,
           remove_epochs=[1, 1], remove_ratios=[0.25, 0.25])


def _pad(**over) -> PADDataSelection:
    return PADDataSelection(**{**PAD, **over})


@pytest.fixture
def count_training(monkeypatch):
    import lightning_distill.difficulty as difficulty

    calls = []
    real = difficulty.train_and_evaluate

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(difficulty, "train_and_evaluate", counting)
    return calls


def test_data_selection_on_writes_a_valid_store_and_records_its_settings(
        reference, tmp_path, count_training):
    _, ref = reference
    store = _train(tmp_path, "pad", callbacks=(_pad(),))
    assert count_training == [1, 1]  # two scoring networks, once
    assert store.validate(deep=True) == [0, 1]
    scores = store.path / "difficulty_el2n.pt"
    assert scores.is_file()
    assert store.hparams["data_selection"] == {"score": "el2n", "score_seed": 0,
                                               "scores_path": None, **PAD}
    assert {k: v for k, v in store.hparams.items() if k != "data_selection"} == ref.hparams
    a, b = store.load_expert(0), ref.load_expert(0)
    assert torch.equal(a[0], b[0])  # same initialisation
    assert not torch.equal(a[1], b[1])  # trained on another subset
    # shards: shard 1 alone, then shard 0 loads the scores (no training) -> the same store
    sharded = dict(callbacks=(_pad(scores_path=str(scores)),))
    s1 = _train(tmp_path, "pad_sharded", shard_index=1, num_shards=2, **sharded)
    assert s1.expert_indices() == [1]
    s0 = _train(tmp_path, "pad_sharded", shard_index=0, num_shards=2, **sharded)
    assert count_training == [1, 1]
    _assert_same_store(s0, store)
    # a rerun after losing an expert loads the scores and retrains it bit for bit
    store.expert_path(1).unlink()
    again = _train(tmp_path, "pad", callbacks=(_pad(),))
    assert count_training == [1, 1]
    _assert_same_store(again, s0)


def test_bad_data_selection_fails_before_training(tmp_path, capsys):
    from lightning_distill.cli import main

    for bad, match in ((dict(num_models=0), "num_models"),
                       (dict(remove_epochs=[3, 1]), "remove_epochs"),
                       (dict(initial_ratio=0.0), "initial_ratio")):
        with pytest.raises(ValueError, match=match):
            _pad(**bad)
    # through the CLI: one line, nothing trained
    recipe = _write_yaml(tmp_path, "bad", tmp_path / "bad.yaml")
    cfg = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    cfg["trainer"]["callbacks"].append({"class_path": "lightning_distill.callbacks."
                                        "PADDataSelection", "init_args": {"initial_ratio": 0.0}})
    recipe.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    capsys.readouterr()
    assert main(["experts", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-distill experts: error:") and "\n" not in err
    assert "initial_ratio" in err
    assert not (tmp_path / "bad").exists()


def test_scores_of_other_data_are_refused(tmp_path):
    from lightning_distill.difficulty import DifficultyScoresError

    cache = str(tmp_path / "scores.pt")
    _train(tmp_path, "a", num_experts=1, callbacks=(_pad(scores_path=cache),))
    with pytest.raises(DifficultyScoresError, match="identity.fingerprint"):
        _train(tmp_path, "b", num_experts=1, callbacks=(_pad(scores_path=cache),),
               data={"split_seed": 1})


# ----------------------------------------------------------------------- recipes
RECIPES = sorted((ROOT / "recipes").glob("*/experts.yaml"))
PAD_RECIPES = ("cifar10", "cifar100", "tiny_imagenet")


def _parse_recipe(path: Path):
    from lightning_distill.cli import parse_lightning_config
    from tests.helpers import flat_config

    return flat_config(parse_lightning_config(["experts", "--config", str(path)]))


def _sharpness(cfg):
    """(class name, init_args) of the recipe's SAM / ASAM / GSAM callback, or None."""
    for cb in cfg.trainer.callbacks or []:
        name = cb.class_path.rsplit(".", 1)[1]
        if name in ("SAM", "ASAM", "GSAM"):
            return name, cb.init_args
    return None


#: expert recipes that reproduce a paper whose experts are plain SGD (TESLA's ImageNet-1K,
#: MTT's ImageNet subsets); every other packaged expert recipe is flat (GSAM, FTD)
PLAIN_SGD_EXPERTS = {"imagenet64": "imagenet64", "imagenet_subsets": "imagenet_subset"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.parent.name for p in RECIPES])
def test_every_experts_recipe_parses(path):
    cfg = _parse_recipe(path)
    folder = path.parent.name
    assert cfg.data.name == PLAIN_SGD_EXPERTS.get(folder, folder)
    assert cfg.num_experts >= 1 and cfg.trainer.max_epochs >= 1
    if folder in PLAIN_SGD_EXPERTS:
        assert _sharpness(cfg) is None and cfg.data.prepared and cfg.data.hold is False
    else:
        assert _sharpness(cfg) is not None


def test_recipes_exist_for_the_five_datasets():
    assert {p.parent.name for p in RECIPES} >= {
        "digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"}


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet"])
def test_cifar_and_tiny_recipes_hold_the_published_settings(name):
    cfg = _parse_recipe(ROOT / "recipes" / name / "experts.yaml")
    assert (cfg.num_experts, cfg.trainer.max_epochs) == (100, 100)
    m = cfg.model
    assert (m.lr, m.momentum, m.weight_decay, m.dsa) == (0.01, 0.0, 0.0, True)
    assert cfg.data.batch_size == 256
    method, args = _sharpness(cfg)
    assert (method, args.rho, args.alpha) == ("GSAM", 0.01, 0.3)
    # every DATM config, TinyImageNet's included, sets zca: True
    assert cfg.data.zca is True
    assert m.model == ("ConvNetD4" if name == "tiny_imagenet" else "ConvNet")


def _callback(cfg, name: str):
    """The init_args of the recipe's callback ``name`` (None: it has none)."""
    for cb in cfg.trainer.callbacks or []:
        if cb.class_path.rsplit(".", 1)[1] == name:
            return cb.init_args
    return None


@pytest.mark.parametrize("name", PAD_RECIPES)
def test_pad_recipes_are_the_datm_experts_with_the_published_schedule(name):
    pad = _parse_recipe(ROOT / "recipes" / name / "experts_pad.yaml")
    base = _parse_recipe(ROOT / "recipes" / name / "experts.yaml")
    ds = _callback(pad, "PADDataSelection")
    assert ds is not None and (ds.num_models, ds.score_epochs) == (10, 10)
    assert (ds.initial_ratio, ds.remove_epochs, ds.remove_ratios) == (0.75, [40, 60], [0.1, 0.2])
    assert ds.add_end_epoch == (20 if name == "cifar10" else 40)
    assert _callback(base, "PADDataSelection") is None
    assert _sharpness(pad) == _sharpness(base)
    same = ("data", "model", "seed", "num_experts", "group_size")
    assert all(pad[k] == base[k] for k in same)
    trainer = {k: v for k, v in vars(pad.trainer).items() if k != "callbacks"}
    assert trainer == {k: v for k, v in vars(base.trainer).items() if k != "callbacks"}
    assert pad.store == f"outputs/{name}/experts_pad" and pad.store != base.store
    assert pad.log_dir != base.log_dir


def test_older_data_selection_key_and_unknown_callback_keys_are_one_error_line(tmp_path, capsys):
    """The experts' former ``data_selection:`` section (PAD is now the PADDataSelection
    callback) and a misspelt key of that callback: one line, exit status 2."""
    from lightning_distill import cli

    old = tmp_path / "experts.yaml"
    old.write_text("data: {name: digits}\ndata_selection:\n  enabled: true\n"
                   "  add_end_epoch: 20\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["experts", "--config", str(old)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-distill experts: error:") and "\n" not in err
    assert "data_selection" in err
    bad = tmp_path / "typo.yaml"
    bad.write_text("data: {name: digits}\ntrainer:\n  callbacks:\n"
                   "  - class_path: lightning_distill.callbacks.PADDataSelection\n"
                   "    init_args: {add_end_epochs: 20}\n", encoding="utf-8")
    assert cli.main(["experts", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "add_end_epochs" in err and "did you mean 'add_end_epoch'" in err
    cfg = cli.parse_lightning_config(
        ["experts", "--trainer.callbacks+=lightning_distill.callbacks.PADDataSelection",
         "--trainer.callbacks.remove_epochs", "[30, 50]"])
    pad = _callback(cfg, "PADDataSelection")
    assert pad is not None and pad.remove_epochs == [30, 50]
