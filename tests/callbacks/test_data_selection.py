"""DataSelection: a tiny expert trains exactly on the scheduled subset of every epoch, on both
loaders, across a resume from a checkpoint, and the datamodule is left as it was."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_distill.callbacks import DataSelection
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.functional import PADSchedule, PADSelection
from lightning_distill.modules.expert import ExpertTrajectoryModule
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*smaller than the logging interval", "ignore:.*does not have many workers",
    "ignore:.*isinstance.treespec, LeafSpec")

# 4 epochs: IR 0.5, AEE 2, rm1 = rm2 = 2, r1 = r2 = 0.25
SCHEDULE = PADSchedule(initial_ratio=0.5, add_end_epoch=2, remove_epochs=(2, 2),
                       remove_ratios=(0.25, 0.25))
EPOCHS = 4


def _datamodule(loader: str = "batched") -> RealDataModule:
    """Digits with each training image's index written into its first pixel (no DSA, so the
    batches a module sees name the training rows)."""
    dm = RealDataModule("digits", batch_size=128, val_fraction=0.1, split_seed=0, shuffle_seed=3,
                        loader=loader)
    dm.setup("fit")
    x, _ = dm.train_set.tensors
    x[:, 0, 0, 0] = torch.arange(x.shape[0], dtype=x.dtype)
    return dm


def _selection(dm: RealDataModule) -> PADSelection:
    _, y = dm.train_set.tensors
    scores = torch.rand(y.numel(), generator=torch.Generator().manual_seed(0))
    return PADSelection(scores, y, SCHEDULE, dm.num_classes)


class RecordBatches(Callback):
    """Per epoch: the training rows of every batch (from the first pixel), the Trainer's
    idea of the number of batches, and whether validation ran."""

    def __init__(self) -> None:
        self.rows: dict[int, list[list[int]]] = {}
        self.num_batches: dict[int, int] = {}
        self.validated: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = batch[0][:, 0, 0, 0].round().long().tolist()
        self.rows.setdefault(trainer.current_epoch, []).append(rows)
        self.num_batches[trainer.current_epoch] = trainer.num_training_batches

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.current_epoch)


def _module() -> ExpertTrajectoryModule:
    pl.seed_everything(0, verbose=False)
    return ExpertTrajectoryModule("ConvNet", channels=1, num_classes=10, image_size=8,
                                  model_kwargs={"width": 4, "depth": 2}, dsa=False)


@pytest.mark.parametrize("loader", ["batched", "dataloader"])
def test_expert_sees_exactly_the_scheduled_indices(loader):
    dm = _datamodule(loader)
    select = _selection(dm)
    n = len(dm.train_set)
    # by hand from the schedule: class sizes are the digits training counts
    sizes = {e: int(select.sizes(e).sum()) for e in range(EPOCHS)}
    counts = select.class_sizes.tolist()
    assert sizes[0] == sum(c // 2 for c in counts)  # floor(0.5 n_c)
    assert sizes[1] == sum(math.floor(0.75 * c) for c in counts)
    assert sizes[2] == n
    assert sizes[3] == n - sum(c // 4 for c in counts)  # floor(0.25 n_c) easiest dropped
    rec = RecordBatches()
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[DataSelection(select), rec],
                            num_sanity_val_steps=0)
    trainer.fit(_module(), datamodule=dm)
    assert sorted(rec.rows) == list(range(EPOCHS))
    for e in range(EPOCHS):
        seen = [i for batch in rec.rows[e] for i in batch]
        assert sorted(seen) == select(e).tolist(), e  # each scheduled row exactly once
        assert rec.num_batches[e] == math.ceil(sizes[e] / 128) == len(rec.rows[e])
    assert rec.validated == list(range(EPOCHS))  # validation after every epoch, any size
    # epoch 0: the easiest half of each class (lowest scores)
    epoch0 = {i for b in rec.rows[0] for i in b}
    for c, order in enumerate(select.orders):
        assert {int(i) for i in order if int(i) in epoch0} == set(order[: counts[c] // 2].tolist())
    # teardown: the datamodule and the Trainer are as they were
    assert dm.train_selection is None and trainer.reload_dataloaders_every_n_epochs == 0
    assert len(dm.train_dataloader()) == math.ceil(n / 128)


def test_resume_from_a_checkpoint_sees_the_same_subsets_and_batches(tmp_path):
    dm = _datamodule()
    select = _selection(dm)
    full = RecordBatches()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                           filename="{epoch}")
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[DataSelection(select), full, ckpt],
                            enable_checkpointing=True, num_sanity_val_steps=0)
    trainer.fit(_module(), datamodule=dm)
    mid = tmp_path / "epoch=1.ckpt"  # saved after epochs 0 and 1
    assert mid.is_file()

    resumed = RecordBatches()
    again = quiet_trainer(max_epochs=EPOCHS, callbacks=[DataSelection(select), resumed],
                          num_sanity_val_steps=0)
    again.fit(_module(), datamodule=dm, ckpt_path=str(mid))
    assert sorted(resumed.rows) == [2, 3]
    for e in (2, 3):
        assert sorted(i for b in resumed.rows[e] for i in b) == select(e).tolist()
        assert resumed.rows[e] == full.rows[e]  # the same batches, in the same order


def test_selection_needs_a_datamodule_and_a_per_epoch_reload():
    dm = _datamodule()
    cb = DataSelection(_selection(dm))

    class Stub:
        datamodule = None
        reload_dataloaders_every_n_epochs = 0
        world_size = 1

    with pytest.raises(TypeError, match="RealDataModule"):
        cb.setup(Stub(), None, "fit")
    Stub.datamodule = dm
    Stub.reload_dataloaders_every_n_epochs = 2
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=2"):
        cb.setup(Stub(), None, "fit")
    assert dm.train_selection is None


class _FakeStrategy:
    def __init__(self, rank0):
        self.rank0 = rank0

    def broadcast(self, obj, src=0):
        return self.rank0

    def reduce_boolean_decision(self, decision, all=True):
        return decision


def test_ranks_with_different_subsets_fail_together():
    dm = _datamodule()
    select = _selection(dm)
    cb = DataSelection(select)

    class Trainer:
        datamodule = dm
        reload_dataloaders_every_n_epochs = 0
        world_size, global_rank, max_epochs = 2, 1, EPOCHS

    t = Trainer()
    t.strategy = _FakeStrategy(cb._digest(EPOCHS))
    cb.setup(t, None, "fit")  # agreement
    assert dm.train_selection is select and t.reload_dataloaders_every_n_epochs == 1
    cb.teardown(t, None, "fit")
    assert dm.train_selection is None and t.reload_dataloaders_every_n_epochs == 0
    y = dm.train_set.tensors[1]
    other = DataSelection(PADSelection(torch.rand(y.numel(), generator=torch.Generator()
                                                  .manual_seed(1)), y, SCHEDULE, 10))
    t.strategy = _FakeStrategy(other._digest(EPOCHS))
    with pytest.raises(RuntimeError, match="select different training subsets"):
        cb.setup(t, None, "fit")
    assert dm.train_selection is None


def test_pad_data_selection_scores_in_setup_and_trains_on_their_schedule(tmp_path):
    """The YAML form: settings in, scores computed into scores_path in setup (then loaded),
    and every epoch trains on PADSelection of those scores, as DataSelection would."""
    from lightning_distill.callbacks import PADDataSelection

    s = SCHEDULE
    make = lambda: PADDataSelection(  # noqa: E731
        initial_ratio=s.initial_ratio, add_end_epoch=s.add_end_epoch,
        remove_epochs=s.remove_epochs, remove_ratios=s.remove_ratios, num_models=1,
        score_epochs=1, scores_path=str(tmp_path / "scores.pt"))
    cb, record = make(), RecordBatches()
    dm = _datamodule()
    quiet_trainer(max_epochs=EPOCHS, callbacks=[cb, record]).fit(_module(), datamodule=dm)
    assert (tmp_path / "scores.pt").is_file() and cb.scores.computed
    _, y = dm.train_set.tensors
    want = PADSelection(cb.scores.scores, y, SCHEDULE, dm.num_classes)
    for e in range(EPOCHS):
        assert sorted(r for b in record.rows[e] for r in b) == want(e).tolist()
    # a second callback loads the file (no scoring networks) and selects the same
    again = make()
    quiet_trainer(max_epochs=1, callbacks=[again]).fit(_module(), datamodule=_datamodule())
    assert not again.scores.computed and torch.equal(again.scores.scores, cb.scores.scores)
    # bad values fail at construction; no file and no recorder: say what to set
    with pytest.raises(ValueError, match="initial_ratio"):
        PADDataSelection(initial_ratio=1.5)
    with pytest.raises(ValueError, match="num_models and score_epochs"):
        PADDataSelection(num_models=0)
    with pytest.raises(ValueError, match="set scores_path"):
        quiet_trainer(max_epochs=1, callbacks=[PADDataSelection()]).fit(
            _module(), datamodule=_datamodule())
