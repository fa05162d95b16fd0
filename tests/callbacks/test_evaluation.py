"""PeriodicEvaluation: schedule, best-set selection by validation accuracy, logging, state."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks.evaluation import PeriodicEvaluation
from lightning_distill.data.augment import make_dsa
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import (
    run_seeds,
    seeded_model,
    summarize,
    train_and_evaluate,
)

TINY = {"width": 4, "depth": 2}
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


class StubDistill(pl.LightningModule):
    """Stands in for DistillationModule: iteration i fills the images with i (EMA: -i)."""

    def __init__(self, with_ema: bool = True, batches: int = 10) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.images = nn.Parameter(torch.zeros(6, 1, 8, 8))
        self.with_ema = with_ema
        self.batches = batches

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.images.fill_(float(batch_idx + 1))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(self.batches)), batch_size=1)

    def configure_optimizers(self):
        return None

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach(), LABELS, 0.05,
                            {"dataset": "toy", "ipc": 2, "num_classes": 3})

    def ema_synthetic_set(self) -> SyntheticSet | None:
        if not self.with_ema:
            return None
        return SyntheticSet(-self.images.detach(), LABELS, 0.05,
                            {"dataset": "toy", "ipc": 2, "num_classes": 3})


class Capture(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def _trainer(callbacks, logger=False) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)


pytestmark = pytest.mark.usefixtures("quiet")


# validation "accuracy" of each evaluated set, keyed by its fill value (EMA sets: negative)
SCORES = {3.0: 0.30, 6.0: 0.70, 9.0: 0.50, 10.0: 0.60,
          -3.0: 0.10, -6.0: 0.20, -9.0: 0.75, -10.0: 0.10}


def _stub_eval(s: SyntheticSet) -> list[float]:
    v = SCORES[float(s.images.flatten()[0])]
    return [v - 0.05, v + 0.05]  # mean v, population std 0.05


def _val():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 1, 8, 8, generator=g), torch.arange(12) % 3


def test_keeps_best_set_by_validation_accuracy_and_logs(tmp_path):
    vx, vy = _val()
    best_path = tmp_path / "best.pt"
    cb = PeriodicEvaluation(vx, vy, every_n_steps=3, evaluate_fn=_stub_eval,
                            best_path=best_path)
    logger = Capture()
    _trainer([cb], logger=logger).fit(StubDistill(batches=10))
    # evaluations at iterations 3, 6, 9 and at train end (10), each logged at the step of
    # the iteration that made the set (k - 1, docs/design.md, 'Steps are iterations')
    rows = [(s, m) for s, m in logger.rows if "val/best_acc" in m]
    assert [s for s, _ in rows] == [2, 5, 8, 9]
    assert [m["val/acc_mean"] for _, m in rows] == pytest.approx([0.30, 0.70, 0.50, 0.60])
    assert [m["val_ema/acc_mean"] for _, m in rows] == pytest.approx([0.10, 0.20, 0.75, 0.10])
    assert [m["val/acc_std"] for _, m in rows] == pytest.approx([0.05] * 4)
    assert [m["val/best_acc"] for _, m in rows] == pytest.approx([0.30, 0.70, 0.75, 0.75])
    # the best is the EMA set of iteration 9
    assert cb.best_accuracy == pytest.approx(0.75) and cb.best_step == 9
    assert cb.best_source == "val_ema"
    assert torch.equal(cb.best_synthetic_set.images, torch.full((6, 1, 8, 8), -9.0))
    saved = SyntheticSet.load(best_path)
    assert torch.equal(saved.images, cb.best_synthetic_set.images)
    assert torch.equal(saved.labels, LABELS) and saved.lr == 0.05
    assert saved.meta["iteration"] == 9 and saved.meta["selected_from"] == "ema"
    assert saved.meta["val_acc_mean"] == pytest.approx(0.75)
    assert best_path.with_suffix(".png").is_file()
    assert len(cb.history) == 8


def test_no_extra_evaluation_at_end_and_without_ema():
    vx, vy = _val()
    cb = PeriodicEvaluation(vx, vy, every_n_steps=3, evaluate_fn=_stub_eval)
    _trainer([cb]).fit(StubDistill(with_ema=False, batches=9))
    assert [h["step"] for h in cb.history] == [3, 6, 9]  # 9 was already evaluated
    assert {h["source"] for h in cb.history} == {"val"}
    assert cb.best_step == 6 and cb.best_accuracy == pytest.approx(0.70)
    assert torch.equal(cb.best_synthetic_set.images, torch.full((6, 1, 8, 8), 6.0))


def test_counts_the_module_iteration_when_it_has_one():
    class Resumed(StubDistill):
        def __init__(self):
            super().__init__(with_ema=False, batches=3)
            self.iteration = 30  # e.g. restored from a checkpoint

        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            self.iteration += 1

    vx, vy = _val()
    cb = PeriodicEvaluation(vx, vy, every_n_steps=11, evaluate_fn=_stub_eval)
    _trainer([cb]).fit(Resumed())
    assert [h["step"] for h in cb.history] == [33]  # 33 = 3 x 11; not again at the end
    assert cb.best_step == 33


def test_state_round_trip_through_weights_only_file(tmp_path):
    vx, vy = _val()
    cb = PeriodicEvaluation(vx, vy, every_n_steps=3, evaluate_fn=_stub_eval)
    _trainer([cb]).fit(StubDistill(batches=10))
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    other = PeriodicEvaluation(vx, vy, every_n_steps=3, evaluate_fn=_stub_eval)
    other.load_state_dict(state)
    assert other.best_accuracy == cb.best_accuracy and other.best_step == 9
    assert other.best_source == "val_ema" and other.last_eval_step == 10
    assert torch.equal(other.best_synthetic_set.images, cb.best_synthetic_set.images)
    assert torch.equal(other.best_synthetic_set.labels, cb.best_synthetic_set.labels)
    assert other.best_synthetic_set.lr == 0.05
    assert other.history == cb.history
    # a restored best is only replaced by a strictly better one
    cb2 = PeriodicEvaluation(vx, vy, every_n_steps=3, evaluate_fn=_stub_eval)
    cb2.load_state_dict(state)
    _trainer([cb2]).fit(StubDistill(with_ema=False, batches=6))
    assert cb2.best_step == 9 and cb2.best_accuracy == pytest.approx(0.75)
    # Lightning checkpoints carry the state too (loadable with weights_only=True)
    trainer = _trainer([cb])
    trainer.fit(StubDistill(with_ema=False, batches=3))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["PeriodicEvaluation"]["best_step"] == 9


def test_default_evaluation_is_the_plain_protocol_without_a_trainer(monkeypatch):
    vx, vy = _val()
    cb = PeriodicEvaluation(vx, vy, every_n_steps=2, runs=2, epochs=2, batch_size=4,
                            model_kwargs=TINY, seed=5, evaluate_ema=False)
    trainer = _trainer([cb])

    def no_trainer(*args, **kwargs):
        raise AssertionError("PeriodicEvaluation must not start a Trainer")

    monkeypatch.setattr(pl.Trainer, "__init__", no_trainer)
    module = StubDistill(with_ema=False, batches=2)
    trainer.fit(module)
    syn = module.synthetic_set()
    accs = []
    for r in range(2):
        init_seed, shuffle_seed, dsa_seed = run_seeds(5 + r)
        net = seeded_model("ConvNet", 1, 3, 8, seed=init_seed, **TINY)
        accs.append(train_and_evaluate(
            net, syn.images, syn.labels, lr=0.05, epochs=2, batch_size=4,
            augment=make_dsa("toy"), generator=torch.Generator().manual_seed(shuffle_seed),
            augment_generator=torch.Generator().manual_seed(dsa_seed),
            test_images=vx, test_labels=vy,
        )["accuracy"])
    assert [h["step"] for h in cb.history] == [2]
    assert cb.history[0]["accs"] == accs
    assert (cb.history[0]["mean"], cb.history[0]["std"]) == summarize(accs)
    assert trainer.callback_metrics["val/acc_mean"].item() == pytest.approx(summarize(accs)[0])
    # evaluating leaves the global RNG alone (distillation stays reproducible)
    state = torch.get_rng_state()
    assert cb.evaluate(syn) == accs
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments():
    vx, vy = _val()
    with pytest.raises(ValueError, match="12 validation images but 11 labels"):
        PeriodicEvaluation(vx, vy[:11])
    cb = PeriodicEvaluation(vx[:, :, :4, :4], vy, runs=1, epochs=1)
    with pytest.raises(ValueError, match="image size mismatch"):
        cb.evaluate(StubDistill().synthetic_set())
