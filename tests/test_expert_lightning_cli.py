"""A user's own stock ``LightningCLI(ExpertTrajectoryModule, RealDataModule)``: the
network's shapes come from the datamodule, the TrajectoryRecorder of
``--trainer.callbacks`` creates the store and takes the next missing expert, and the
distillation accepts the store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

from lightning_distill import ExpertTrajectoryModule, RealDataModule
from lightning_distill.callbacks import TrajectoryRecorder
from lightning_distill.trajectories import TrajectoryStore

CONFIG = """\
model:
  model: ConvNet       # channels, num_classes, image_size: from the datamodule
  model_kwargs: {{width: 4, depth: 2}}
  lr: 0.05
  dsa_flip: false
data:
  name: digits
  batch_size: 256
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_distill.callbacks.GSAM
      init_args: {{rho: 0.05}}
    - class_path: lightning_distill.callbacks.TrajectoryRecorder
      init_args: {{store: {store}}}
"""


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds arguments too (pytest's)."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def _fit(config: Path, seed: int) -> LightningCLI:
    """Expert ``seed``: its own initialisation, DSA draws and data order."""
    return LightningCLI(ExpertTrajectoryModule, RealDataModule,
                        args=["fit", "--config", str(config), "--seed_everything", str(seed),
                              "--model.dsa_seed", str(seed), "--data.shuffle_seed", str(seed)],
                        save_config_kwargs={"overwrite": True})


def test_stock_lightning_cli_records_experts_the_distillation_accepts(tmp_path: Path):
    from lightning_distill.modules.distill import DistillationModule

    store_path = tmp_path / "experts"
    config = tmp_path / "experts.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "logs", store=store_path))

    first = _fit(config, seed=0)
    assert isinstance(first.model, ExpertTrajectoryModule)
    hp = first.model.hparams
    assert (hp.channels, hp.num_classes, hp.image_size) == (1, 10, (8, 8))
    store = TrajectoryStore.open(store_path)
    assert store.validate(deep=True) == [0]
    assert store.num_snapshots == 3 and store.dataset == "digits"
    assert store.model == {"name": "ConvNet", "channels": 1, "num_classes": 10,
                           "image_size": [8, 8], "width": 4, "depth": 2}
    assert store.input_space == first.datamodule.input_space
    assert store.hparams["sharpness"]["method"] == "gsam"
    assert store.hparams["module"]["lr"] == 0.05
    assert {"train/loss_epoch", "train/acc", "val/loss", "val/acc"} <= set(
        first.trainer.logged_metrics)
    snaps = store.load_expert(0, mmap=False)
    assert torch.equal(snaps[-1], torch.cat([p.detach().reshape(-1)
                                             for p in first.model.net.parameters()]))

    second = _fit(config, seed=1)  # the same command again: the next expert
    (rec,) = [c for c in second.trainer.callbacks if isinstance(c, TrajectoryRecorder)]
    assert rec.expert_index == 1
    assert store.validate(deep=True) == [0, 1]
    assert not torch.equal(store.load_expert(0), store.load_expert(1))

    # the distillation takes the store as it is (its constructor validates it) ...
    module = DistillationModule(str(store_path), 1, iterations=2, syn_steps=2, expert_epochs=1,
                                max_start_epoch=1, batch_syn=None, lr_teacher=0.05,
                                dsa_flip=False, seed=0)
    # ... and runs on it
    dm = RealDataModule("digits")
    module.initialize(dm)
    before = module.images.detach().clone()
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module)
    assert int(module.iteration) == 2
    assert not torch.equal(module.images.detach(), before)
    assert torch.isfinite(module.images).all()
    # ... and so does the `distill` subcommand
    from lightning_distill import SyntheticSet, cli

    out = tmp_path / "ipc1"
    assert cli.main(["distill", "--config", "digits/ipc1", f"--model.store={store_path}",
                     "--model.iterations=2", "--model.syn_steps=2", "--model.expert_epochs=1",
                     "--model.max_start_epoch=1", f"--output={out}",
                     "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]) == 0
    assert SyntheticSet.load(out / "synthetic.pt").meta["iteration"] == 2


def test_the_expert_callbacks_are_built_from_command_line_flags(tmp_path: Path):
    """Plain types in every expert callback's __init__: LightningCLI builds them from
    flags (``run=False``: parse and instantiate only)."""
    from lightning_distill.callbacks import ASAM, GSAM, SAM, GroupTrajectoryRecorder

    store = str(tmp_path / "experts")
    cli = LightningCLI(ExpertTrajectoryModule, RealDataModule, run=False, args=[
        "--data.name", "digits", "--trainer.max_epochs", "2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_distill.callbacks.TrajectoryRecorder",
        f"--trainer.callbacks.store={store}", "--trainer.callbacks.every_n_epochs=2",
        "--trainer.callbacks+=lightning_distill.callbacks.GroupTrajectoryRecorder",
        f"--trainer.callbacks.store={store}", "--trainer.callbacks.expert_indices=[3, 4]",
        "--trainer.callbacks+=lightning_distill.callbacks.GSAM",
        "--trainer.callbacks.alpha=0.4",
        "--trainer.callbacks+=lightning_distill.callbacks.SAM",
        "--trainer.callbacks+=lightning_distill.callbacks.ASAM",
    ])
    got = {type(c): c for c in cli.trainer.callbacks}
    rec, group = got[TrajectoryRecorder], got[GroupTrajectoryRecorder]
    assert (rec._store_arg, rec.expert_index, rec.every_n_epochs) == (store, None, 2)
    assert group.expert_indices == [3, 4] and got[GSAM].alpha == 0.4
    assert SAM in got and ASAM in got
    assert cli.model.net is None and cli.model.hparams.num_classes is None  # built in fit
