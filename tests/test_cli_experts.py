"""`lightning-distill experts` as a LightningCLI: the same experts as the stage's builder
(train_experts) called directly, bit for bit, resume, shards, and the store the
distillation reads."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_distill import TrajectoryStore, cli
from lightning_distill.callbacks import GSAM, PADDataSelection
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.stages.experts import train_experts

TINY = ["--config", "digits/experts", "--trainer.max_epochs", "2",
        "--model.model_kwargs", "{width: 4, depth: 2}", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_model_summary", "false"]


pytestmark = pytest.mark.usefixtures("quiet")


def experts(tmp_path, store: str, *extra: str) -> int:
    return cli.main(["experts", *TINY, "--store", str(tmp_path / store),
                     "--log_dir", str(tmp_path / "logs"), *extra])


def snapshots(path) -> list[torch.Tensor]:
    store = TrajectoryStore.open(path)
    return [torch.load(store.expert_path(i), weights_only=True)
            for i in store.expert_indices()]


def builder(tmp_path, store: str, callbacks=(), **kw) -> TrajectoryStore:
    """The experts of :data:`TINY` (digits/experts with 2 epochs, ConvNet width 4) from
    :func:`train_experts` called directly, into ``tmp_path / store``."""
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 4, "depth": 2},
                                   lr=0.05)
    trainer_kwargs = dict(accelerator="cpu", enable_progress_bar=False, max_epochs=2,
                          callbacks=[GSAM(rho=0.01, alpha=0.3), *callbacks])
    return train_experts(model, RealDataModule("digits", batch_size=32), trainer_kwargs,
                         store=str(tmp_path / store), log_dir=str(tmp_path / f"{store}_logs"),
                         **kw)


def test_cli_experts_equal_the_builders_bit_for_bit(tmp_path):
    assert experts(tmp_path, "cli", "--num_experts", "3", "--group_size", "2") == 0
    builder(tmp_path, "stage", num_experts=3, group_size=2)
    ours, theirs = snapshots(tmp_path / "cli"), snapshots(tmp_path / "stage")
    assert len(ours) == len(theirs) == 3
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    store = TrajectoryStore.open(tmp_path / "cli")
    assert store.hparams["sharpness"]["method"] == "gsam" and store.hparams["seed"] == 0
    assert store.hparams == TrajectoryStore.open(tmp_path / "stage").hparams
    assert store.num_snapshots == 3 and store.dataset == "digits"
    # LightningCLI's config.yaml went to the first Trainer's log directory
    assert list((tmp_path / "logs").rglob("config.yaml"))


def test_rerun_resumes_and_shards_union_to_the_whole_store(tmp_path):
    assert experts(tmp_path, "s", "--num_experts", "1", "--group_size", "1") == 0
    first = snapshots(tmp_path / "s")
    assert experts(tmp_path, "s", "--num_experts", "3", "--group_size", "1",
                   "--shard_index", "1", "--num_shards", "2") == 0
    assert TrajectoryStore.open(tmp_path / "s").expert_indices() == [0, 1]
    assert experts(tmp_path, "s", "--num_experts", "3", "--group_size", "1") == 0
    assert TrajectoryStore.open(tmp_path / "s").expert_indices() == [0, 1, 2]
    assert torch.equal(snapshots(tmp_path / "s")[0], first[0])  # not retrained
    assert experts(tmp_path, "whole", "--num_experts", "3", "--group_size", "1") == 0
    assert all(torch.equal(a, b) for a, b in zip(snapshots(tmp_path / "s"),
                                                 snapshots(tmp_path / "whole"), strict=True))


def test_max_epochs_is_required_and_bad_numbers_are_named(tmp_path, capsys):
    assert experts(tmp_path, "x", "--num_experts", "2", "--shard_index", "3") == 2
    assert "shard_index must be in [0, num_shards=1)" in capsys.readouterr().err
    assert experts(tmp_path, "x", "--trainer.max_epochs", "null") == 2
    assert "set trainer.max_epochs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


class TaggedExpert(ExpertTrajectoryModule):
    """A user's subclass with an argument of its own (trains as its parent)."""

    made: list[str] = []

    def __init__(self, tag: str = "none", **kwargs):
        super().__init__(**kwargs)
        type(self).made.append(tag)


def test_subclass_mode_trains_a_users_expert_class_one_at_a_time(tmp_path, capsys):
    """`--model.class_path` picks a user's ExpertTrajectoryModule subclass: each expert is
    one of it, its own argument included; it trains one at a time (the vectorised group is
    GroupExpertModule's), and its snapshots equal the parent class's bit for bit."""
    TaggedExpert.made.clear()
    assert experts(tmp_path, "sub", "--num_experts", "2", "--group_size", "2",
                   "--model.class_path", f"{__name__}.TaggedExpert",
                   "--model.init_args.tag", "mine") == 0
    # the template the CLI instantiates, then one per expert
    assert TaggedExpert.made == ["mine"] * 3
    assert "one at a time (group_size 1, not 2)" in capsys.readouterr().out
    assert experts(tmp_path, "base", "--num_experts", "2", "--group_size", "1") == 0
    assert all(torch.equal(a, b) for a, b in zip(snapshots(tmp_path / "sub"),
                                                 snapshots(tmp_path / "base"), strict=True))


def test_pad_data_selection_as_a_yaml_callback_equals_the_builders(tmp_path, capsys):
    """PADDataSelection in `trainer.callbacks` (YAML-writable: settings only) trains the
    same experts, bit for bit, as the callback object handed to train_experts, one at a
    time whatever group_size, and the store records the same settings; the scores go
    into the store."""
    values = dict(num_models=2, score_epochs=1, score_lr=0.05, initial_ratio=0.5,
                  add_end_epoch=1, remove_epochs=[1, 1], remove_ratios=[0.25, 0.25])
    a = builder(tmp_path, "direct", callbacks=[PADDataSelection(**values)], num_experts=2,
                group_size=1)
    callback = json.dumps({"class_path": "lightning_distill.callbacks.PADDataSelection",
                           "init_args": values})
    capsys.readouterr()
    assert experts(tmp_path, "callback", "--num_experts", "2", "--group_size", "2",
                   "--trainer.callbacks+", callback) == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line (rich wraps it)
    assert "PADDataSelection callback selects the data" in out
    assert "one at a time (group_size 1, not 2)" in out
    b = TrajectoryStore.open(tmp_path / "callback")
    assert all(torch.equal(x, y) for x, y in zip(snapshots(a.path), snapshots(b.path),
                                                 strict=True))
    assert a.hparams["data_selection"] == b.hparams["data_selection"]
    assert b.hparams["data_selection"]["initial_ratio"] == 0.5
    assert (b.path / "difficulty_el2n.pt").is_file()
    capsys.readouterr()
    assert experts(tmp_path, "both", "--num_experts", "1", "--trainer.callbacks+", callback,
                   "--trainer.callbacks+", callback) == 2
    assert "one PADDataSelection callback at a time" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()
