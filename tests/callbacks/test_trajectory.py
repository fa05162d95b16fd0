"""TrajectoryRecorder: E+1 snapshots equal to the parameters at those moments, rank 0 writes,
no partial expert on early stop, state survives a checkpoint resume."""

import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks.trajectory import TrajectoryRecorder
from lightning_distill.errors import ConfigError
from lightning_distill.models.params import ParamSpec
from lightning_distill.trajectories import TrajectoryStore

LR = 0.1


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    y = torch.randn(8, 2, generator=g)
    return x, y


class LinearModule(pl.LightningModule):
    """y = W x + b trained with MSE and plain SGD; ``net`` holds the network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*data()), batch_size=4, shuffle=False)


class Capture(Callback):
    """Independent record of the parameters at train start and every epoch end."""

    def __init__(self):
        self.seen = []

    def _grab(self, pl_module):
        self.seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_start(self, trainer, pl_module):
        self._grab(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._grab(pl_module)


def make_store(path, snapshots=4, module_attr=None):
    """A store whose spec is the LightningModule's ('net.weight', ...) or the net's ('weight')."""
    spec = ParamSpec.of(LinearModule() if module_attr is None else nn.Linear(3, 2))
    return TrajectoryStore.create(
        path, spec=spec, num_snapshots=snapshots,
        model={"name": "Linear"}, dataset="toy", input_space={}, hparams={"lr": LR},
    )


def trainer(max_epochs, callbacks, **kw):
    return pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), **kw,
    )


def hand_sgd(w, b, epochs):
    """The same SGD steps computed by hand: grad of mean((Wx+b-y)^2) over a batch of 4."""
    x, y = data()
    out = [(w.clone(), b.clone())]
    for _ in range(epochs):
        for k in range(0, 8, 4):
            xb, yb = x[k:k + 4], y[k:k + 4]
            r = xb @ w.T + b - yb  # [4, 2]
            gw = 2 * r.T @ xb / r.numel()
            gb = 2 * r.sum(0) / r.numel()
            w, b = w - LR * gw, b - LR * gb
        out.append((w.clone(), b.clone()))
    return out


@pytest.mark.parametrize("module_attr", [None, "net"])
def test_records_epochs_plus_one_snapshots(tmp_path, module_attr):
    store = make_store(tmp_path / "store", module_attr=module_attr)
    module = LinearModule()
    w0, b0 = module.net.weight.detach().clone(), module.net.bias.detach().clone()
    cap = Capture()
    trainer(3, [TrajectoryRecorder(store, 0, module_attr=module_attr), cap]).fit(module)
    got = store.load_expert(0)
    assert got.shape == (4, 8)
    # equal (bit for bit) to the parameters seen at those moments by another callback
    expected = torch.stack([torch.cat([s["net.weight"].reshape(-1), s["net.bias"]])
                            for s in cap.seen])
    assert torch.equal(got, expected)
    assert torch.equal(got[0], torch.cat([w0.reshape(-1), b0]))
    # and to the SGD steps computed by hand
    for row, (w, b) in zip(got, hand_sgd(w0, b0, 3), strict=True):
        torch.testing.assert_close(row, torch.cat([w.reshape(-1), b]), rtol=0, atol=1e-6)
    assert not torch.equal(got[0], got[3])  # it did train


def test_every_n_epochs(tmp_path):
    store = make_store(tmp_path / "store", snapshots=3)
    cap = Capture()
    trainer(4, [TrajectoryRecorder(str(tmp_path / "store"), 2, every_n_epochs=2), cap]).fit(
        LinearModule()
    )
    flat = [torch.cat([s["net.weight"].reshape(-1), s["net.bias"]]) for s in cap.seen]
    assert torch.equal(store.load_expert(2), torch.stack([flat[0], flat[2], flat[4]]))


def test_max_epochs_and_model_checked_at_setup(tmp_path):
    store = make_store(tmp_path / "store")
    with pytest.raises(ValueError, match=r"max_epochs=2.*4 snapshots.*max_epochs=3"):
        trainer(2, [TrajectoryRecorder(store, 0)]).fit(LinearModule())
    other = TrajectoryStore.create(
        tmp_path / "other", spec=ParamSpec.of(nn.Linear(3, 5)), num_snapshots=4,
        model={"name": "Linear"}, dataset="toy",
    )
    with pytest.raises(Exception, match="does not match the trajectory store"):
        trainer(3, [TrajectoryRecorder(other, 0, module_attr="net")]).fit(LinearModule())
    with pytest.raises(ConfigError, match="no attribute path 'backbone'"):
        trainer(3, [TrajectoryRecorder(store, 0, module_attr="backbone")]).fit(LinearModule())
    assert store.num_experts == 0 and other.num_experts == 0


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("allow_partial", [False, True])
def test_early_stop_writes_no_expert(tmp_path, allow_partial):
    store = make_store(tmp_path / "store")
    cap = Capture()
    rec = TrajectoryRecorder(store, 5, allow_partial=allow_partial)
    with pytest.warns(UserWarning, match=r"expert 5 ended with snapshots after epochs \[0, 1, 2\]"):
        trainer(3, [rec, cap, StopAfter(1)]).fit(LinearModule())
    assert store.expert_indices() == []
    partial = tmp_path / "store" / "expert_00005.partial.pt"
    assert partial.exists() == allow_partial
    if allow_partial:
        saved = torch.load(partial, weights_only=True)
        assert saved["epochs"].tolist() == [0, 1, 2]
        flat = [torch.cat([s["net.weight"].reshape(-1), s["net.bias"]]) for s in cap.seen]
        assert torch.equal(saved["snapshots"], torch.stack(flat))


def fake_trainer(rank0, epoch, barrier_calls):
    return SimpleNamespace(
        is_global_zero=rank0, current_epoch=epoch, max_epochs=3,
        strategy=SimpleNamespace(barrier=lambda name=None: barrier_calls.append(name)),
    )


def drive(rec, module, rank0, barrier_calls, epochs=range(3), end=True):
    """Run the recorder's hooks as a Trainer would, with SGD-like parameter changes."""
    rec.setup(fake_trainer(rank0, 0, barrier_calls), module, "fit")
    rec.on_train_start(fake_trainer(rank0, epochs[0], barrier_calls), module)
    for e in epochs:
        with torch.no_grad():
            module.net.weight.add_(1.0)
        rec.on_train_epoch_end(fake_trainer(rank0, e, barrier_calls), module)
    if end:
        rec.on_train_end(fake_trainer(rank0, epochs[-1], barrier_calls), module)


def test_only_global_rank_zero_writes(tmp_path):
    store = make_store(tmp_path / "store", module_attr="net")
    calls = []
    rec1 = TrajectoryRecorder(store, 1, module_attr="net")
    drive(rec1, LinearModule(), rank0=False, barrier_calls=calls)
    assert store.expert_indices() == [] and rec1.recorded_epochs == []
    assert calls == ["TrajectoryRecorder.on_train_end"]  # non-zero ranks wait for rank 0
    rec0 = TrajectoryRecorder(store, 1, module_attr="net")
    module = LinearModule()
    w0 = module.net.weight.detach().clone()
    drive(rec0, module, rank0=True, barrier_calls=calls)
    assert store.expert_indices() == [1]
    got = store.load_expert(1)
    for e in range(4):  # weight + e after e epochs of the fake "training"
        assert torch.equal(got[e, :6], (w0 + e).reshape(-1))
    assert len(calls) == 2


def test_state_dict_round_trip(tmp_path):
    store = make_store(tmp_path / "store", module_attr="net")
    calls = []
    module = LinearModule()
    rec = TrajectoryRecorder(store, 3, module_attr="net")
    drive(rec, module, True, calls, epochs=range(2), end=False)  # 2 of 3 epochs done
    state = rec.state_dict()
    assert state["epochs"].tolist() == [0, 1, 2] and state["snapshots"].shape == (3, 8)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)  # checkpoints load with weights_only=True

    fresh = TrajectoryRecorder(store, 3, module_attr="net")
    fresh.load_state_dict(loaded)
    assert fresh.recorded_epochs == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict()["snapshots"],
                                                 state["snapshots"], strict=True))
    # continue the expert where the checkpoint left it
    drive(fresh, module, True, calls, epochs=range(2, 3))
    got = store.load_expert(3)
    assert torch.equal(got[:3], state["snapshots"])
    assert torch.equal(got[3, :6], module.net.weight.detach().reshape(-1))
    with pytest.raises(ValueError, match="state is for expert 3"):
        TrajectoryRecorder(store, 4).load_state_dict(loaded)
    assert TrajectoryRecorder(store, 3).state_key != TrajectoryRecorder(store, 4).state_key


class Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("killed")


class WithValidation(LinearModule):
    """ModelCheckpoint then saves around validation rather than at train-epoch end."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def val_dataloader(self):
        return DataLoader(TensorDataset(*data()), batch_size=4)


@pytest.mark.parametrize("module_cls", [LinearModule, WithValidation])
def test_checkpoint_resume_mid_expert_gives_same_trajectory(tmp_path, module_cls):
    ref_store = make_store(tmp_path / "ref")
    trainer(3, [TrajectoryRecorder(ref_store, 0)]).fit(module_cls())

    store = make_store(tmp_path / "store")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(3, [TrajectoryRecorder(store, 0), ckpt, Crash()],
                enable_checkpointing=True).fit(module_cls())
    assert store.expert_indices() == []  # no partial expert after the crash
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(3, [TrajectoryRecorder(store, 0)]).fit(
            module_cls(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert torch.equal(store.load_expert(0), ref_store.load_expert(0))


def test_resume_without_recorder_state_refused(tmp_path):
    store = make_store(tmp_path / "store")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(3, [ckpt, Crash()], enable_checkpointing=True).fit(LinearModule())
    with pytest.raises(RuntimeError, match=r"resumes at epoch 2 but the snapshots after epochs "
                       r"\[0, 1\] are missing"):
        trainer(3, [TrajectoryRecorder(store, 0)]).fit(
            LinearModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert store.expert_indices() == []


# ------------------------------------------------- automatic index, store created
def test_without_an_index_the_first_missing_expert_is_recorded(tmp_path):
    store = make_store(tmp_path / "store")
    filler = torch.zeros(4, 8)
    store.write_expert(0, filler)
    store.write_expert(2, filler)
    rec = TrajectoryRecorder(str(tmp_path / "store"))
    trainer(3, [rec]).fit(LinearModule())
    assert rec.expert_index == 1 and store.expert_indices() == [0, 1, 2]
    assert not torch.equal(store.load_expert(1), filler)
    trainer(3, [rec]).fit(LinearModule())  # the same recorder again: the next missing one
    assert rec.expert_index == 3 and store.expert_indices() == [0, 1, 2, 3]
    assert "auto" in rec.state_key and rec.state_key == TrajectoryRecorder(store).state_key


def test_resume_mid_expert_with_an_automatic_index(tmp_path):
    ref_store = make_store(tmp_path / "ref")
    trainer(3, [TrajectoryRecorder(ref_store)]).fit(LinearModule())
    store = make_store(tmp_path / "store")
    store.write_expert(0, torch.zeros(4, 8))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(3, [TrajectoryRecorder(store), ckpt, Crash()],
                enable_checkpointing=True).fit(LinearModule())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert saved["TrajectoryRecorder{'expert_index': 'auto'}"]["expert_index"] == 1
    rec = TrajectoryRecorder(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(3, [rec]).fit(LinearModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert rec.expert_index == 1 and store.expert_indices() == [0, 1]
    assert torch.equal(store.load_expert(1), ref_store.load_expert(0))


class Shaped(pl.LightningDataModule):
    """What a store needs of a datamodule: name, input_space (and shapes, batch_size)."""

    name, batch_size, channels, num_classes, image_size = "tiny", 4, 1, 3, (8, 8)
    input_space = {"dataset": "tiny", "normalization": "meanstd", "mean": [0.0], "std": [1.0]}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 1, 8, 8, generator=g),
                                        torch.arange(8) % 3), batch_size=4)


def expert_module():
    from lightning_distill.modules.expert import ExpertTrajectoryModule

    return ExpertTrajectoryModule("ConvNet", channels=None, num_classes=None, image_size=None,
                                  model_kwargs={"width": 4, "depth": 2}, lr=0.05, dsa_flip=False,
                                  dsa_seed=7)


def test_a_missing_store_is_created_from_the_module_and_the_datamodule(tmp_path):
    from lightning_distill.callbacks import GSAM
    from lightning_distill.data.input_space import InputSpace
    from lightning_distill.models import build_model

    path = tmp_path / "new" / "store"
    module = expert_module()
    cap = Capture()
    trainer(4, [TrajectoryRecorder(str(path), every_n_epochs=2), GSAM(rho=0.05), cap]).fit(
        module, datamodule=Shaped())
    store = TrajectoryStore.open(path)
    assert store.expert_indices() == [0] and store.num_snapshots == 3
    assert store.model == {"name": "ConvNet", "channels": 1, "num_classes": 3,
                           "image_size": [8, 8], "width": 4, "depth": 2}
    assert store.spec == ParamSpec.of(build_model(**store.model))
    assert store.dataset == "tiny" and store.input_space == InputSpace.coerce(Shaped.input_space)
    hp = store.hparams
    assert hp["epochs"] == 4 and hp["batch_size"] == 4
    assert hp["sharpness"] == {"method": "gsam", "rho": 0.05, "alpha": 0.3, "adaptive": True}
    assert hp["module"]["lr"] == 0.05 and "dsa_seed" not in hp["module"]
    # module_attr None: the module's trajectory_module_attr ("net") is recorded
    got = store.load_expert(0)
    flat = [torch.cat([v.reshape(-1) for k, v in s.items() if k.startswith("net.")])
            for s in cap.seen]
    assert torch.equal(got, torch.stack([flat[0], flat[2], flat[4]]))
    store.validate(deep=True)
    # the same store again: the next expert, the store's meta.json untouched
    meta = (path / "meta.json").read_text()
    trainer(4, [TrajectoryRecorder(path, every_n_epochs=2)]).fit(expert_module(),
                                                                  datamodule=Shaped())
    assert store.expert_indices() == [0, 1] and (path / "meta.json").read_text() == meta


def test_creating_a_store_needs_the_module_hparams_a_datamodule_and_max_epochs(tmp_path):
    path = str(tmp_path / "store")
    with pytest.raises(ValueError, match=r"no hyperparameters \['model', 'channels'"):
        trainer(3, [TrajectoryRecorder(path)]).fit(LinearModule())
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8, generator=g),
                                      torch.arange(4) % 3), batch_size=4)
    module = expert_module()
    module.hparams.update(channels=1, num_classes=3, image_size=8)
    module.configure_model()
    with pytest.raises(ValueError, match="there is no datamodule"):
        trainer(3, [TrajectoryRecorder(path)]).fit(module, loader)
    with pytest.raises(ValueError, match="max_epochs.*multiple of every_n_epochs=2"):
        trainer(3, [TrajectoryRecorder(path, every_n_epochs=2)]).fit(expert_module(),
                                                                      datamodule=Shaped())
    assert not (tmp_path / "store").exists()


def test_a_datamodule_of_another_input_space_is_refused(tmp_path):
    path = tmp_path / "store"
    trainer(2, [TrajectoryRecorder(path)]).fit(expert_module(), datamodule=Shaped())

    class Whitened(Shaped):
        input_space = {"dataset": "tiny", "normalization": "zca", "zca_fingerprint": "ab12"}

    with pytest.raises(ValueError, match="input space differs.*normalization = 'meanstd' "
                                         "vs 'zca'"):
        trainer(2, [TrajectoryRecorder(path)]).fit(expert_module(), datamodule=Whitened())
    assert TrajectoryStore.open(path).expert_indices() == [0]
