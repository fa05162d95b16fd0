"""ExpertTrajectoryModule: loss protocol, DSA generator checkpointing, exact SGD, logging."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.modules.expert import ExpertTrajectoryModule

MODEL = dict(model="ConvNet", channels=1, num_classes=3, image_size=8,
             model_kwargs={"width": 4, "depth": 2})


def _module(seed: int = 0, **kw) -> ExpertTrajectoryModule:
    torch.manual_seed(seed)
    opts = dict(MODEL, dsa_flip=False, dsa_seed=123)
    opts.update(kw)
    return ExpertTrajectoryModule(**opts)


def _data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(x, y, batch: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(**kw) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_loss_closure_recomputes_the_same_augmented_batch():
    m = _module()
    x, y = _data(6)
    gen = copy.deepcopy(m.dsa_generator)  # replay the augmentation by hand
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = m.training_step((x, y), 0)
    x_aug = m.augment.apply(x, m.augment.sample(x, generator=gen))
    assert not torch.equal(x_aug, x)  # DSA is active
    assert torch.equal(loss, F.cross_entropy(m.net(x_aug), y))
    assert torch.equal(m.loss_closure(), loss)
    assert torch.equal(m.loss_closure(), loss)  # repeatable: no new augmentation draw
    # the closure uses the CURRENT parameters (GSAM evaluates it at w + e)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05)
    moved = m.loss_closure()
    assert torch.equal(moved, F.cross_entropy(m.net(x_aug), y))
    assert moved.item() != loss.item()
    # a second step draws a new augmentation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.training_step((x, y), 1)
    assert not torch.equal(m.loss_closure(), moved)


def test_dsa_generator_is_seeded_by_dsa_seed():
    a, b, c = _module(dsa_seed=7), _module(dsa_seed=7), _module(dsa_seed=8)
    ra = torch.rand(5, generator=a.dsa_generator)
    assert torch.equal(ra, torch.rand(5, generator=b.dsa_generator))
    assert not torch.equal(ra, torch.rand(5, generator=c.dsa_generator))
    assert a.dsa_generator.device.type == "cpu"


def test_dsa_generator_state_through_checkpoint_resumes_bit_identically(tmp_path: Path):
    x, y = _data(12)
    # uninterrupted: 2 epochs
    full = _module(seed=3)
    _trainer(max_epochs=2).fit(full, _loader(x, y))
    # 1 epoch, checkpoint, resume to 2 epochs in a fresh module
    first = _module(seed=3)
    t1 = _trainer(max_epochs=1)
    t1.fit(first, _loader(x, y))
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["dsa_generator_state"]
    assert torch.equal(saved, first.dsa_generator.get_state())
    resumed = _module(seed=99, dsa_seed=5)  # weights and DSA stream must come from the ckpt
    _trainer(max_epochs=2).fit(resumed, _loader(x, y), ckpt_path=ckpt)
    assert torch.equal(_flat(resumed.net), _flat(full.net))
    assert torch.equal(resumed.dsa_generator.get_state(), full.dsa_generator.get_state())

    # control: without the generator state the resumed run diverges (and warns)
    state = torch.load(ckpt, weights_only=True)
    del state["dsa_generator_state"]
    torch.save(state, tmp_path / "nogen.ckpt")
    blind = _module(seed=3)
    with pytest.warns(UserWarning, match="dsa_generator_state"):
        _trainer(max_epochs=2).fit(blind, _loader(x, y), ckpt_path=tmp_path / "nogen.ckpt")
    assert not torch.equal(_flat(blind.net), _flat(full.net))


def _hand_epoch(net, opt, x, y) -> tuple[list[tuple[float, int]], int]:
    """One epoch of the hand-written SGD loop on ``_loader``'s batches: each step's
    (loss, batch size) and the number of correct predictions before the steps."""
    steps, correct = [], 0
    for xb, yb in _loader(x, y):
        opt.zero_grad()
        logits = net(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        opt.step()
        steps.append((loss.item(), len(yb)))
        correct += int((logits.argmax(1) == yb).sum())
    return steps, correct


def test_epoch_metrics_are_each_epochs_own_means():
    """train/loss_epoch and train/acc, logged at each epoch's end from torchmetrics
    objects, are that epoch's batch-weighted mean loss and accuracy (reset between
    epochs, a partial last batch weighted by its size), against a hand-written loop."""
    x, y = _data(10)  # batches of 4, 4, 2
    m = _module(seed=5, dsa=False, lr=0.1)
    net = copy.deepcopy(m.net)

    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def _take(self, trainer):
            cm = trainer.callback_metrics
            self.seen.append((float(cm["train/loss_epoch"]), float(cm["train/acc"])))

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch > 0:  # the previous epoch's values
                self._take(trainer)

        def on_train_end(self, trainer, pl_module):
            self._take(trainer)

    rec = Record()
    _trainer(max_epochs=3, callbacks=[rec]).fit(m, _loader(x, y))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hand = []
    for _ in range(3):
        losses, correct = _hand_epoch(net, opt, x, y)
        hand.append((sum(loss * b for loss, b in losses) / 10, correct / 10))
    assert torch.equal(_flat(m.net), _flat(net))
    assert len(rec.seen) == 3
    for (loss, acc), (hand_loss, hand_acc) in zip(rec.seen, hand, strict=True):
        assert loss == pytest.approx(hand_loss, rel=1e-6)
        assert acc == pytest.approx(hand_acc, abs=1e-7)
    assert len({round(v[0], 6) for v in rec.seen}) == 3  # the loss moved between epochs


def test_one_epoch_without_dsa_equals_hand_sgd_and_logs_metrics(tmp_path: Path):
    from pytorch_lightning.loggers import TensorBoardLogger

    x, y = _data(12)
    xv, yv = _data(9, seed=2)
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    m = _module(seed=5, dsa=False, **hp)
    net = copy.deepcopy(m.net)
    logger = TensorBoardLogger(tmp_path, name="expert", version=0, default_hp_metric=False)
    trainer = _trainer(logger=logger, log_every_n_steps=1)
    trainer.fit(m, _loader(x, y), _loader(xv, yv, batch=9))

    # the hand-written loop on the same batches
    opt = torch.optim.SGD(net.parameters(), **hp)
    steps, correct = _hand_epoch(net, opt, x, y)
    losses = [loss for loss, _ in steps]
    assert torch.equal(_flat(m.net), _flat(net))
    assert _flat(m.net).sub(_flat(_module(seed=5).net)).abs().max() > 1e-3  # it moved

    logged = trainer.logged_metrics
    assert logged["train/loss_epoch"].item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert logged["train/acc"].item() == pytest.approx(correct / 12, abs=1e-7)
    with torch.no_grad():
        logits_v = net(xv)
    assert logged["val/acc"].item() == pytest.approx(
        (logits_v.argmax(1) == yv).float().mean().item(), abs=1e-7)
    assert logged["val/loss"].item() == pytest.approx(
        F.cross_entropy(logits_v, yv).item(), rel=1e-6)

    # ... and they reach TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(logger.log_dir))).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/acc", "val/loss"} <= tags
    assert acc.Scalars("val/acc")[-1].value == pytest.approx(logged["val/acc"].item())
    assert len(acc.Scalars("train/loss_step")) == 3


# ------------------------------------------------------------ accuracy (torchmetrics)
def test_accuracies_are_torchmetrics_objects_equal_to_a_hand_count():
    """Uneven batches (5 + 4 samples), sanity-check batches before the epoch: the logged
    accuracies are correct / total over the whole split, as the hand count."""
    from torchmetrics.classification import MulticlassAccuracy

    x, y = _data(9, seed=3)
    xv, yv = _data(9, seed=4)
    m = _module(seed=2, dsa=False, lr=0.0)  # lr 0: the network is the same at every step
    assert all(isinstance(getattr(m, f"{p}_acc"), MulticlassAccuracy)
               for p in ("train", "val", "test"))
    assert not any(k.endswith(("_acc", "tp", "fp", "tn", "fn")) for k in m.state_dict())
    trainer = _trainer(num_sanity_val_steps=1)
    trainer.fit(m, _loader(x, y, batch=5), _loader(xv, yv, batch=5))
    with torch.no_grad():
        hand = {s: int((m.net(a).argmax(1) == b).sum()) / 9 for s, a, b in
                (("train", x, y), ("val", xv, yv))}
    assert 0 < hand["train"] < 1 and 0 < hand["val"] < 1  # a non-trivial count
    logged = trainer.logged_metrics
    assert logged["train/acc"].item() == pytest.approx(hand["train"], abs=1e-7)
    assert logged["val/acc"].item() == pytest.approx(hand["val"], abs=1e-7)
    out = trainer.test(m, _loader(xv, yv, batch=4), verbose=False)
    assert out[0]["test/acc"] == pytest.approx(hand["val"], abs=1e-7)
    assert out[0]["test/loss"] == pytest.approx(F.cross_entropy(m.net(xv), yv).item(), rel=1e-6)


# ------------------------------------------------------- shapes from the datamodule
class _ShapedData(pl.LightningDataModule):
    """Tiny tensors that, like RealDataModule, expose their shapes after setup()."""

    def __init__(self, shapes: bool = True) -> None:
        super().__init__()
        self.shapes = shapes
        self.x = self.y = None

    def setup(self, stage: str | None = None) -> None:
        self.x, self.y = _data(12)
        if self.shapes:
            self.channels, self.num_classes, self.image_size = 1, 3, (8, 8)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.x, self.y)


NO_SHAPES = dict(channels=None, num_classes=None, image_size=None)


def test_shapes_from_the_datamodule_build_the_network_eager_construction_builds():
    eager = _module(seed=4)
    _trainer(max_epochs=2).fit(eager, datamodule=_ShapedData())

    deferred = _module(seed=4, **NO_SHAPES)
    assert deferred.net is None
    with pytest.raises(RuntimeError, match="configure_model"):
        deferred(torch.zeros(1, 1, 8, 8))
    _trainer(max_epochs=2).fit(deferred, datamodule=_ShapedData())
    assert torch.equal(_flat(deferred.net), _flat(eager.net))  # same seed, same expert
    assert (deferred.hparams.channels, deferred.hparams.num_classes,
            deferred.hparams.image_size) == (1, 3, (8, 8))
    # partly given: the rest from the datamodule
    part = _module(seed=4, num_classes=None)
    _trainer(max_epochs=2).fit(part, datamodule=_ShapedData())
    assert torch.equal(_flat(part.net), _flat(eager.net))


def test_missing_shapes_without_a_datamodule_that_has_them_are_refused():
    x, y = _data(12)
    with pytest.raises(ValueError, match=r"\['channels', 'num_classes', 'image_size'\] not "
                                         r"given and there is no Trainer datamodule"):
        _trainer().fit(_module(**NO_SHAPES), _loader(x, y))
    with pytest.raises(ValueError, match=r"_ShapedData does not provide channels \(no such "
                                         r"attribute\)"):
        _trainer().fit(_module(channels=None), datamodule=_ShapedData(shapes=False))
    with pytest.raises(ValueError, match="no Trainer datamodule"):
        _module(**NO_SHAPES).configure_model()  # outside a Trainer


def test_deferred_network_resumes_a_checkpoint_and_loads_with_the_real_shapes(tmp_path: Path):
    full = _module(seed=6, **NO_SHAPES)
    _trainer(max_epochs=2).fit(full, datamodule=_ShapedData())
    first = _module(seed=6, **NO_SHAPES)
    t1 = _trainer(max_epochs=1)
    t1.fit(first, datamodule=_ShapedData())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert (saved["channels"], saved["num_classes"], saved["image_size"]) == (1, 3, (8, 8))
    # configure_model builds the network before Lightning loads the checkpoint's weights
    resumed = _module(seed=99, **NO_SHAPES)
    _trainer(max_epochs=2).fit(resumed, datamodule=_ShapedData(), ckpt_path=ckpt)
    assert torch.equal(_flat(resumed.net), _flat(full.net))
    # the checkpoint's hyperparameters hold the shapes: built at construction
    loaded = ExpertTrajectoryModule.load_from_checkpoint(ckpt, weights_only=True)
    assert torch.equal(_flat(loaded.net), _flat(first.net))


def test_configure_model_builds_on_the_cpu_in_float32_inside_lightnings_contexts():
    """Lightning calls configure_model inside the strategy's device context (CUDA on a
    GPU) and a true precision's default dtype: the network is still built as eager
    construction builds it (CPU, float32, the CPU generator); Lightning moves it later."""
    eager = _module(seed=8)
    deferred = _module(seed=8, **NO_SHAPES)
    deferred.hparams.update(channels=1, num_classes=3, image_size=8)
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            deferred.configure_model()
    finally:
        torch.set_default_dtype(dtype)
    p = next(deferred.net.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    assert torch.equal(_flat(deferred.net), _flat(eager.net))
    assert deferred.val_acc.tp.device.type == "cpu"
