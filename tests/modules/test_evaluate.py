"""EvalModule inside trainer.fit equals the plain loop; lr schedule; soft CE; errors."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.data.augment import make_dsa
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import (
    evaluate_accuracy,
    run_seeds,
    seeded_model,
    train_and_evaluate,
)
from lightning_distill.modules.evaluate import EvalModule, evaluate_synthetic

TINY = {"width": 4, "depth": 2}


def _set(soft: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    if soft:
        labels = torch.randn(6, 3, generator=g)
    return SyntheticSet(images, labels, 0.05, {"dataset": "toy", "ipc": 2, "num_classes": 3})


def _test_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 3


def _trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))


pytestmark = pytest.mark.usefixtures("quiet")


class _LrSpy(pl.Callback):
    """Per epoch: the lr and the number of momentum buffers at the epoch's first batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            opt = trainer.optimizers[0]
            self.rows.append((trainer.current_epoch, opt.param_groups[0]["lr"], len(opt.state)))


@pytest.mark.parametrize("soft", [False, True])
def test_trainer_run_equals_plain_loop_bitwise(soft):
    syn = _set(soft)
    test_x, test_y = _test_data()
    epochs, bs, seed = 4, 4, 3  # 2 batches per epoch (4 + 2), decay at epoch 2
    module = EvalModule(syn, model="ConvNet", model_kwargs=TINY, epochs=epochs, batch_size=bs,
                        seed=seed)
    spy = _LrSpy()
    trainer = _trainer(epochs, [spy])
    trainer.fit(module)
    out = trainer.test(module, dataloaders=DataLoader(TensorDataset(test_x, test_y),
                                                      batch_size=7), verbose=False)
    # the schedule: lr for 2 epochs, then exactly 10x lower with the momentum buffers reset
    assert [r[1] for r in spy.rows] == [0.05, 0.05, 0.05 * 0.1, 0.05 * 0.1]
    assert [r[2] for r in spy.rows][0] == 0 and spy.rows[2][2] == 0 and spy.rows[1][2] > 0
    # the plain loop with the same seeds: same init, batch order and DSA draws
    init_seed, shuffle_seed, dsa_seed = run_seeds(seed)
    net = seeded_model("ConvNet", 1, 3, 8, seed=init_seed, **TINY)
    res = train_and_evaluate(
        net, syn.images, syn.labels, lr=syn.lr, epochs=epochs, batch_size=bs,
        augment=make_dsa("toy"), generator=torch.Generator().manual_seed(shuffle_seed),
        augment_generator=torch.Generator().manual_seed(dsa_seed),
        test_images=test_x, test_labels=test_y,
    )
    for (name, a), b in zip(module.net.named_parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert module.test_accuracy == res["accuracy"]
    assert out[0]["test/acc"] == pytest.approx(res["accuracy"], abs=1e-7)
    assert module.test_accuracy == evaluate_accuracy(net, test_x, test_y)


class _EpochLoss(pl.Callback):
    """Each step's mean loss and batch size, and the logged train/loss of each epoch."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[float, int]]] = {}
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        runs = len(pl_module.seeds) if pl_module.grouped else 1  # a group returns the sum
        self.steps.setdefault(trainer.current_epoch, []).append(
            (float(outputs["loss"]) / runs, batch[1].shape[-1]))

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self.logged.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module):
        self.logged.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("seed", [3, [3, 4]], ids=["one_run", "group_of_2"])
def test_train_loss_is_each_epochs_batch_weighted_mean(seed):
    """train/loss (Lightning's epoch mean of the per-step values) is every epoch's own
    mean of the step losses (over a group's runs too), weighted by the batch sizes (4, 2)."""
    module = EvalModule(_set(), model="ConvNet", model_kwargs=TINY, epochs=3, batch_size=4,
                        seed=seed)
    rec = _EpochLoss()
    _trainer(3, [rec]).fit(module)
    assert len(rec.logged) == 3 and sorted(rec.steps) == [0, 1, 2]
    for epoch, logged in enumerate(rec.logged):
        steps = rec.steps[epoch]
        assert [b for _, b in steps] == [4, 2]
        want = sum(loss * b for loss, b in steps) / sum(b for _, b in steps)
        assert logged == pytest.approx(want, rel=1e-6)
    assert len({round(v, 6) for v in rec.logged}) == 3


class _StopAfter(pl.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """4 epochs = 2 epochs + checkpoint + 2 resumed epochs (decay at 2, DSA on): the
    shuffle and DSA streams (both CPU generators, so a GPU checkpoint resumes on a CPU)
    travel in the checkpoint."""
    syn = _set()
    kw = dict(model="ConvNet", model_kwargs=TINY, epochs=4, batch_size=4, seed=5)
    full = EvalModule(syn, **kw)
    _trainer(4).fit(full)

    first = EvalModule(syn, **kw)
    assert first.dsa_generator.device.type == "cpu"
    trainer = _trainer(4, [_StopAfter(2)])
    trainer.fit(first)
    assert trainer.current_epoch == 2
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["eval_generators"]
    assert torch.equal(saved["dsa"], first.dsa_generator.get_state())

    resumed = EvalModule(syn, **kw)
    _trainer(4).fit(resumed, ckpt_path=ckpt)
    for (name, a), b in zip(resumed.net.named_parameters(), full.net.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(resumed.dsa_generator.get_state(), full.dsa_generator.get_state())
    # without the generator states the resumed run differs (the streams matter)
    state = torch.load(ckpt, weights_only=True)
    del state["eval_generators"]
    torch.save(state, tmp_path / "bare.ckpt")
    bare = EvalModule(syn, **kw)
    _trainer(4).fit(bare, ckpt_path=tmp_path / "bare.ckpt")
    assert not torch.equal(next(bare.net.parameters()), next(full.net.parameters()))


def test_evaluate_synthetic_both_paths_agree():
    syn = _set()
    test_x, test_y = _test_data()
    kw = dict(models=("ConvNet",), runs=2, seed=11, epochs=2, batch_size=4,
              model_kwargs={"ConvNet": TINY})
    plain = evaluate_synthetic(syn, test_x, test_y, **kw)
    via_trainer = evaluate_synthetic(syn, test_x, test_y, use_trainer=True, **kw)
    assert plain["ConvNet"]["accs"] == via_trainer["ConvNet"]["accs"]
    accs = plain["ConvNet"]["accs"]
    assert len(accs) == 2
    assert plain["ConvNet"]["mean"] == pytest.approx(sum(accs) / 2, abs=1e-15)
    assert plain["ConvNet"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2, abs=1e-15)


def test_soft_training_step_is_soft_cross_entropy():
    syn = _set(soft=True)
    module = EvalModule(syn, model_kwargs=TINY, epochs=2, dsa=False)
    x, y = syn.images[:4], syn.labels[:4]
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        out = module.net(x)
    hand = -(F.softmax(y, 1) * F.log_softmax(out, 1)).sum(1).mean()
    assert float(loss) == pytest.approx(float(hand), rel=1e-6)
    hard = EvalModule(_set(), model_kwargs=TINY, epochs=2, dsa=False)
    yh = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        expect = F.cross_entropy(hard.net(x), yh)
    assert float(hard.training_step((x, yh), 0)) == pytest.approx(float(expect), rel=1e-6)


def test_lr_default_and_override_and_file_input(tmp_path):
    syn = _set()
    path = syn.save(tmp_path / "s.pt", grid=False)
    m = EvalModule(str(path), model_kwargs=TINY, epochs=10)
    assert m.eval_lr == 0.05 and m.decay_epoch == 5 and m.hparams.synthetic == str(path)
    assert EvalModule(syn, model_kwargs=TINY, lr=0.2).eval_lr == 0.2
    # the same seed gives the same network, another seed another one
    a = EvalModule(syn, model_kwargs=TINY, seed=1).net
    b = EvalModule(syn, model_kwargs=TINY, seed=1).net
    c = EvalModule(syn, model_kwargs=TINY, seed=2).net
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_errors():
    syn = _set()
    module = EvalModule(syn, model_kwargs=TINY, epochs=3)
    with pytest.raises(ValueError, match=r"needs Trainer\(max_epochs=3\)"):
        _trainer(2).fit(module)

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2).long()))

    with pytest.raises(ValueError, match="would replace it"):
        _trainer(3).fit(module, datamodule=DM())
    test_x, test_y = _test_data()
    with pytest.raises(ValueError, match="channels mismatch"):
        evaluate_synthetic(syn, test_x.expand(20, 3, 8, 8), test_y, epochs=1)
    with pytest.raises(ValueError, match="image size mismatch"):
        evaluate_synthetic(syn, torch.zeros(4, 1, 28, 28), test_y[:4], epochs=1)
    with pytest.raises(ValueError, match="test labels reach class 9"):
        evaluate_synthetic(syn, test_x[:2], torch.tensor([0, 9]), epochs=1)
    with pytest.raises(ValueError, match="input space mismatch"):
        zsyn = SyntheticSet(syn.images, syn.labels, 0.05,
                            {"input_space": {"normalization": "zca", "zca_fingerprint": "a"}})
        evaluate_synthetic(zsyn, test_x, test_y, epochs=1,
                           input_space={"normalization": "zca", "zca_fingerprint": "b"})
