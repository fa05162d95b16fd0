"""EvalModule under the plain Lightning API: ``trainer.fit(module, datamodule=
SyntheticDataModule(...))`` then ``trainer.test(module, datamodule=...)`` gives exactly
:func:`evaluate_synthetic`'s accuracies (tiny digits setting, CPU); the torchmetrics
accuracies equal the hand count, per run in a group; per-class accuracies; the
datamodule's refusals and its YAML-only configuration."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import SyntheticDataModule
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.modules.evaluate import EvalModule, evaluate_synthetic
from tests.helpers import random_digits_set

MKW = {"width": 8, "depth": 2}
PROTOCOL = dict(epochs=10, batch_size=8)  # 20 images: batches of 8, 8, 4; lr drop at epoch 5


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def digits():
    dm = RealDataModule("digits")
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def syn_path(tmp_path_factory):
    """A random-real ipc-2 digits set on disk (with the data's input space)."""
    return random_digits_set().save(tmp_path_factory.mktemp("syn") / "syn.pt", grid=False)


def _trainer(epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def _fit_and_test(syn_path, seed):
    module = EvalModule(str(syn_path), model="ConvNet", model_kwargs=MKW, seed=seed,
                        **PROTOCOL)
    dm = SyntheticDataModule(str(syn_path), name="digits")
    trainer = _trainer(module.epochs)  # stock Trainer: sanity check and validation each epoch
    trainer.fit(module, datamodule=dm)
    out = trainer.test(module, datamodule=dm, verbose=False)
    return module, dm, out[0]


@pytest.mark.parametrize("grouped", [False, True])
def test_fit_and_test_with_the_datamodule_equal_evaluate_synthetic(digits, syn_path, grouped):
    seed = [3, 4, 5] if grouped else 3
    module, dm, logged = _fit_and_test(syn_path, seed)
    tx, ty = digits.test_set.tensors
    kw = dict(runs=3 if grouped else 1, seed=3, group_size=3 if grouped else 1, device="cpu",
              model_kwargs={"ConvNet": MKW}, **PROTOCOL)
    plain = evaluate_synthetic(str(syn_path), tx, ty, **kw)["ConvNet"]
    via_trainer = evaluate_synthetic(str(syn_path), tx, ty, use_trainer=True, **kw)["ConvNet"]
    print("datamodule", module.test_accuracies, "evaluate_synthetic", plain["accs"])
    assert module.test_accuracies == plain["accs"] == via_trainer["accs"]  # exact
    assert module.test_class_accuracies == plain["class_accs"] == via_trainer["class_accs"]
    assert module.test_class_accuracy == plain["class_mean"]
    assert len(set(plain["accs"])) == len(plain["accs"])  # different seeds, different nets
    # the logged values: the torchmetrics compute(), float32
    assert logged["test/acc"] == pytest.approx(plain["mean"], abs=1e-6)
    for c in range(10):
        assert logged[f"test/acc_class/{c}"] == pytest.approx(plain["class_mean"][c], abs=1e-6)
    # validation ran on the real validation split every epoch (without changing training)
    n_val = len(dm.val_set)
    assert n_val > 0 and module.val_accuracies is not None
    assert all(abs(a * n_val - round(a * n_val)) < 1e-9 for a in module.val_accuracies)


def test_the_datamodule_serves_the_modules_loader(digits, syn_path):
    """Same batches, same order, epoch after epoch: the datamodule asks the module."""
    dm = SyntheticDataModule(str(syn_path))  # name from the set's meta
    assert dm.real.name == "digits" and dm.real.batch_size == 1024
    a = EvalModule(str(syn_path), model_kwargs=MKW, seed=[1, 2], **PROTOCOL)
    b = EvalModule(str(syn_path), model_kwargs=MKW, seed=[1, 2], **PROTOCOL)

    class _Trainer:
        lightning_module = b

    dm.trainer = _Trainer()
    own, served = a.train_dataloader(), dm.train_dataloader()
    for _ in range(2):
        for (x1, y1), (x2, y2) in zip(own, served, strict=True):
            assert x1.shape[0] == 2 and y1.shape[0] == 2  # [K, B, ...]
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    dm.trainer = None
    with pytest.raises(RuntimeError, match="no Trainer is attached"):
        dm.train_dataloader()


def test_accuracy_metrics_equal_the_hand_count_per_run():
    """A hand-built batch through a group of 2 runs: each run's accuracy, per-class
    accuracies and the logged mean equal the counts by hand."""
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]),
                       0.05, {"dataset": "toy", "num_classes": 3})
    module = EvalModule(syn, model_kwargs={"width": 4, "depth": 2}, seed=[0, 1], epochs=1)
    x = torch.randn(7, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore
    module.log_dict = lambda d, **kw: logged.update(d)  # type: ignore
    # two batches: counts accumulate over batches
    module.on_test_epoch_start()
    module.test_step((x[:4], y[:4]), 0)
    module.test_step((x[4:], y[4:]), 1)
    module.on_test_epoch_end()
    with torch.no_grad():
        preds = module.net.forward_shared(x).argmax(2)  # [2, 7]
    hits = preds == y
    hand = [int(h.sum()) / 7 for h in hits]
    hand_class = [[int(h[y == c].sum()) / int((y == c).sum()) for c in range(3)] for h in hits]
    print("hand", hand, "metric", module.test_accuracies)
    assert module.test_accuracies == hand
    assert module.test_accuracy == (hand[0] + hand[1]) / 2
    assert module.test_class_accuracies == hand_class
    assert float(logged["test/acc"]) == pytest.approx(sum(hand) / 2, abs=1e-7)
    for c in range(3):
        assert float(logged[f"test/acc_class/{c}"]) == pytest.approx(
            (hand_class[0][c] + hand_class[1][c]) / 2, abs=1e-7)
    # the metrics were reset: a new test epoch starts from zero
    assert all(int(m.tp.sum()) == 0 for m in module.test_acc)
    # a class without test images: no per-class accuracy, nothing logged for it
    logged.clear()
    module.on_test_epoch_start()
    module.test_step((x[:2], torch.tensor([0, 1])), 0)
    module.on_test_epoch_end()
    assert [row[2] for row in module.test_class_accuracies] == [None, None]
    assert module.test_class_accuracy[2] is None and "test/acc_class/2" not in logged


def test_one_run_trainer_test_logs_through_torchmetrics(syn_path, digits):
    module = EvalModule(str(syn_path), model_kwargs=MKW, seed=0, epochs=1)
    tx, ty = digits.test_set.tensors[0][:50], digits.test_set.tensors[1][:50]
    trainer = _trainer(1, num_sanity_val_steps=0)
    out = trainer.test(module, dataloaders=DataLoader(TensorDataset(tx, ty), batch_size=16),
                       verbose=False)[0]
    with torch.no_grad():
        module.net.eval()
        hits = module.net(tx).argmax(1) == ty
    assert module.test_accuracy == int(hits.sum()) / 50
    assert out["test/acc"] == pytest.approx(int(hits.sum()) / 50, abs=1e-7)
    assert sorted(k for k in out if k.startswith("test/acc_class/")) == sorted(
        f"test/acc_class/{c}" for c in ty.unique().tolist())


def test_datamodule_refuses_a_set_of_another_input_space(digits, syn_path, tmp_path):
    syn = SyntheticSet.load(syn_path)
    # ZCA data vs a mean/std set: refused at setup, naming the field
    dm = SyntheticDataModule(syn, name="digits", zca=True)
    with pytest.raises(ValueError, match=r"input space mismatch \(normalization"):
        dm.setup("fit")
    other = SyntheticSet(syn.images, syn.labels, syn.lr,
                         {**syn.meta, "input_space": {**dict(syn.input_space), "std": [9.0]}})
    with pytest.raises(ValueError, match=r"input space mismatch \(std"):
        SyntheticDataModule(other, name="digits").setup("test")
    with pytest.raises(ValueError, match="distilled from the data set 'digits'.*'mnist'"):
        SyntheticDataModule(syn, name="mnist")
    few = SyntheticSet(syn.images[:6], torch.tensor([0, 0, 1, 1, 2, 2]), 0.02,
                       {"dataset": "digits", "num_classes": 3})
    with pytest.raises(ValueError, match="classes mismatch"):
        SyntheticDataModule(few).setup("test")
    with pytest.raises(ValueError, match="records no data set"):
        SyntheticDataModule(SyntheticSet(syn.images, syn.labels, 0.02))
    with pytest.raises(ValueError, match=r"\['zca'\]"):
        SyntheticDataModule(syn, real=RealDataModule("digits"), zca=True)
    bad = SyntheticSet(syn.images.clone(), syn.labels, 0.02, dict(syn.meta))
    bad.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        SyntheticDataModule(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        EvalModule(bad, model_kwargs=MKW)
    # a real data module given as an object: its splits are used
    real = RealDataModule("digits", batch_size=100)
    dm = SyntheticDataModule(syn, real=real)
    dm.setup("test")
    assert dm.test_set is real.test_set and len(next(iter(dm.test_dataloader()))[0]) == 100


def test_module_refuses_a_datamodule_over_another_set(digits, syn_path):
    module = EvalModule(str(syn_path), model_kwargs=MKW, seed=0, epochs=1)
    syn = SyntheticSet.load(syn_path)
    other = SyntheticSet(syn.images.flip(0), syn.labels.flip(0), syn.lr, dict(syn.meta))
    with pytest.raises(ValueError, match="serves another synthetic set"):
        _trainer(1).fit(module, datamodule=SyntheticDataModule(other))


def test_datamodule_is_configured_by_a_stock_lightning_cli(syn_path, tmp_path):
    """Every argument of SyntheticDataModule (and EvalModule) is written in YAML."""
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "eval.yaml"
    config.write_text(
        "model:\n"
        f"  synthetic: {syn_path}\n"
        "  model: ConvNet\n"
        "  model_kwargs: {width: 8, depth: 2}\n"
        "  protocol: {epochs: 2, batch_size: 8}\n"
        "  seed: [0, 1]\n"
        "data:\n"
        f"  synthetic: {syn_path}\n"
        "  name: digits\n"
        "  val_fraction: 0.1\n"
        "  split_seed: 0\n"
        "  zca: false\n"
        "  batch_size: 512\n"
        "trainer:\n"
        "  max_epochs: 2\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n")
    cli = LightningCLI(EvalModule, SyntheticDataModule, run=False, save_config_callback=None,
                       args=["--config", str(config),
                             f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.datamodule, SyntheticDataModule)
    assert cli.datamodule.real.batch_size == 512 and cli.model.seeds == [0, 1]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert len(cli.model.test_accuracies) == 2


@pytest.mark.parametrize("seed", [3, [3, 4]])
def test_without_a_set_the_module_trains_on_the_datamodules_bit_for_bit(syn_path, seed):
    """EvalModule() bound to the SyntheticDataModule's set in configure_model gives the
    accuracies of EvalModule(set): the same networks, batches and DSA draws."""
    accs = []
    for given in (str(syn_path), None):
        module = EvalModule(given, model_kwargs=MKW, seed=seed, **PROTOCOL)
        data = SyntheticDataModule(str(syn_path), name="digits")
        trainer = _trainer(module.epochs)
        trainer.fit(module, datamodule=data)
        trainer.test(module, datamodule=data)
        accs.append((module.test_accuracies, module.test_class_accuracies))
    assert accs[0] == accs[1]
    with pytest.raises(ValueError, match="got no synthetic set"):
        _trainer(10).fit(EvalModule(model_kwargs=MKW, **PROTOCOL),
                         train_dataloaders=DataLoader(TensorDataset(torch.zeros(2, 1))))
