"""CUDA checks: the GPU paths against the CPU (run by benchmarks/gpu_session.sh on a GPU).

The device is CUDA where available, else the CPU (or ``LIGHTNING_DISTILL_TEST_DEVICE``):
without a GPU the same code runs CPU against CPU, so the tests themselves stay exercised
in CI, and the comparisons are then tight by construction.

GPU results differ from the CPU's by float rounding (cuDNN algorithms, atomics in
grid_sample's backward), so the comparisons use tolerances; the float64 ones are tight.
TF32 is switched off here (PyTorch lets cuDNN use it by default; its 10-bit mantissa
would dominate the float32 comparisons).
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch

from lightning_distill.callbacks.iteration_checkpoint import IterationCheckpoint
from lightning_distill.callbacks.sharpness import GSAM
from lightning_distill.callbacks.trajectory import TrajectoryRecorder
from lightning_distill.data.augment import DSA
from lightning_distill.data.datamodule import TensorBatchLoader
from lightning_distill.functional import sample_minibatches, trajectory_matching_loss
from lightning_distill.functional.device import to_device
from lightning_distill.models import build_model, flatten_parameters
from lightning_distill.models.params import ParamSpec
from lightning_distill.modules.evaluate import evaluate_synthetic, trainer_device_args
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.trajectories import TrajectoryStore
from tests.helpers import (
    TINY_INPUT_SPACE,
    CrashAt,
    build_tiny_store,
    distill_resume_setup,
    init_distill_module,
    quiet_trainer,
    tiny_data,
)

DEVICE = torch.device(os.environ.get("LIGHTNING_DISTILL_TEST_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
DT = torch.float64


@pytest.fixture(autouse=True)
def _full_float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _trainer(**kw) -> pl.Trainer:
    """A quiet one-device Trainer on DEVICE."""
    return quiet_trainer(**trainer_device_args(DEVICE), **kw)


def test_to_device_and_minibatches():
    x = torch.arange(10)
    y = to_device(x, DEVICE)
    assert y.device.type == DEVICE.type and torch.equal(y.cpu(), x)
    cpu = sample_minibatches(10, 4, 5, torch.Generator().manual_seed(0))
    dev = sample_minibatches(10, 4, 5, torch.Generator().manual_seed(0), device=DEVICE)
    assert [b.numel() for b in dev] == [4, 4, 2, 4, 4]
    for a, b in zip(cpu, dev, strict=True):
        assert b.device.type == DEVICE.type and torch.equal(a, b.cpu())


def _problem(device, soft: bool):
    torch.manual_seed(0)
    model = build_model("ConvNet", channels=3, num_classes=3, image_size=8, width=4,
                        depth=2).to(DT)
    g = torch.Generator().manual_seed(1)
    start = flatten_parameters(model).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=DT)
    images = torch.randn(6, 3, 8, 8, generator=g, dtype=DT)
    labels = 2.0 * torch.randn(6, 3, generator=g, dtype=DT) if soft else torch.arange(6) % 3
    model, start, target = model.to(device), start.to(device), target.to(device)
    images = images.to(device).requires_grad_(True)
    labels = labels.to(device)
    if soft:
        labels.requires_grad_(True)
    syn_lr = torch.tensor(0.05, dtype=DT, device=device, requires_grad=True)
    return model, start, target, images, labels, syn_lr


def _grads(device, mode, soft):
    model, start, target, images, labels, syn_lr = _problem(device, soft)
    batches = sample_minibatches(6, 4, 5, torch.Generator().manual_seed(2))  # CPU indices
    loss = trajectory_matching_loss(model, start, target, images, labels, syn_lr, batches,
                                    DSA(), mode, generator=torch.Generator().manual_seed(3))
    loss.backward()
    out = [loss.detach(), images.grad, syn_lr.grad] + ([labels.grad] if soft else [])
    return [t.cpu() for t in out]


@pytest.mark.parametrize("soft", [True, False])
def test_matching_on_the_device_equals_the_cpu_in_float64(soft):
    """Same DSA draws (CPU generator) and minibatches on both devices: full and recompute
    on the device equal full on the CPU; recompute equals full there to 1e-10."""
    cpu = _grads(torch.device("cpu"), "full", soft)
    full = _grads(DEVICE, "full", soft)
    rec = _grads(DEVICE, "recompute", soft)
    for a, b, c in zip(cpu, full, rec, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=0, atol=1e-10)
    tesla = _grads(DEVICE, "tesla", soft)
    cos = torch.nn.functional.cosine_similarity(tesla[1].flatten(), cpu[1].flatten(), dim=0)
    assert float(cos) > 0.9


class _Devices(pl.Callback):
    """The device types of the synthetic images during training."""

    def __init__(self) -> None:
        self.types: set[str] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.types.add(module.images.device.type)


def test_distillation_on_the_device_resumes_there_and_on_the_cpu(tmp_path):
    """4 iterations on the device == 2 + checkpoint + 2 resumed on the device, and the
    device checkpoint resumes on the CPU; all close to a CPU run."""
    store = tmp_path / "experts"
    build_tiny_store(store, experts=2, epochs=4)
    x, y = tiny_data()

    def fresh(initialise=True):
        module, callbacks = distill_resume_setup(store, iterations=4)
        return (init_distill_module(module) if initialise else module), callbacks

    cpu, callbacks = fresh()
    quiet_trainer(callbacks=callbacks).fit(cpu)
    straight, callbacks = fresh()
    seen = _Devices()
    _trainer(callbacks=[*callbacks, seen]).fit(straight)  # (teardown moves it to the CPU)
    assert int(straight.iteration) == 4 and seen.types == {DEVICE.type}
    tol = dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(straight.images.detach().cpu(), cpu.images.detach(), **tol)
    torch.testing.assert_close(straight.syn_lr.detach().cpu(), cpu.syn_lr.detach(), **tol)
    assert (cpu.images.detach() - fresh()[0].images.detach()).abs().max() > 1e-3  # trained

    crashed, callbacks = fresh()
    ckpt = IterationCheckpoint(tmp_path / "ckpt", every_n=2)
    with pytest.raises(KeyError, match="simulated crash"):
        _trainer(callbacks=[*callbacks, ckpt, CrashAt(2)]).fit(crashed)
    resumed, callbacks = fresh(initialise=False)
    _trainer(callbacks=callbacks).fit(resumed, ckpt_path=str(ckpt.last))
    assert int(resumed.iteration) == 4
    torch.testing.assert_close(resumed.images.detach().cpu(), straight.images.detach().cpu(),
                               rtol=1e-4, atol=1e-5)
    on_cpu, callbacks = fresh(initialise=False)
    quiet_trainer(callbacks=callbacks).fit(on_cpu, ckpt_path=str(ckpt.last))
    assert int(on_cpu.iteration) == 4
    torch.testing.assert_close(on_cpu.images.detach(), cpu.images.detach(), **tol)
    # the synthetic set and its evaluation on the device
    syn = straight.synthetic_set()
    res = evaluate_synthetic(syn, x, y, runs=2, epochs=3, batch_size=4, seed=1,
                             model_kwargs={"ConvNet": {"width": 4, "depth": 2}}, device=DEVICE)
    ref = evaluate_synthetic(syn, x, y, runs=2, epochs=3, batch_size=4, seed=1,
                             model_kwargs={"ConvNet": {"width": 4, "depth": 2}}, device="cpu")
    assert len(res["ConvNet"]["accs"]) == 2
    # a few SGD steps from identical inits: the accuracies agree up to near-tie flips
    assert abs(res["ConvNet"]["mean"] - ref["ConvNet"]["mean"]) <= 0.2


def test_gsam_expert_on_the_device_records_its_trajectory(tmp_path):
    """GSAM + DSA + TrajectoryRecorder on the device: the store holds E + 1 CPU float32
    snapshots, the first the initialisation, and the trajectory stays close to the CPU's."""
    x, y = tiny_data(per_class=8)
    stores = {}
    for name, device in (("cpu", torch.device("cpu")), ("dev", DEVICE)):
        torch.manual_seed(0)
        module = ExpertTrajectoryModule("ConvNet", channels=1, num_classes=3, image_size=8,
                                        model_kwargs={"width": 4, "depth": 2}, lr=0.05,
                                        dsa_seed=5)
        init = flatten_parameters(module.net).detach().clone()
        spec = ParamSpec.of(module.net)
        store = TrajectoryStore.create(
            tmp_path / name, spec=spec, num_snapshots=3,
            model={"name": "ConvNet", "channels": 1, "num_classes": 3, "image_size": 8,
                   "width": 4, "depth": 2},
            dataset="tiny", input_space=TINY_INPUT_SPACE, hparams={"kind": "test"})
        loader = TensorBatchLoader(x, y, batch_size=8, shuffle=True,
                                   generator=torch.Generator().manual_seed(1))
        trainer = quiet_trainer(
            **trainer_device_args(device), max_epochs=2, num_sanity_val_steps=0,
            callbacks=[GSAM(rho=0.05, alpha=0.3),
                       TrajectoryRecorder(store, expert_index=0, module_attr="net")])
        trainer.fit(module, loader)
        snaps = store.load_expert(0, mmap=False)
        assert snaps.shape == (3, spec.total) and snaps.dtype == torch.float32
        assert snaps.device.type == "cpu" and torch.isfinite(snaps).all()
        assert torch.equal(snaps[0], init)
        stores[name] = snaps
    torch.testing.assert_close(stores["dev"], stores["cpu"], rtol=1e-3, atol=1e-4)
    assert (stores["cpu"][2] - stores["cpu"][0]).abs().max() > 1e-3  # it moved


class _TinyData(pl.LightningDataModule):
    """tiny_data with what RealDataModule exposes after setup: shapes, name, input space."""

    name, channels, num_classes, image_size, batch_size = "tiny", 1, 3, (8, 8), 8
    input_space = TINY_INPUT_SPACE

    def train_dataloader(self):
        x, y = tiny_data(per_class=8)
        return TensorBatchLoader(x, y, batch_size=8, shuffle=True,
                                 generator=torch.Generator().manual_seed(1))

    def val_dataloader(self):
        x, y = tiny_data(per_class=4, seed=1)
        return TensorBatchLoader(x, y, batch_size=5)


def test_expert_with_shapes_from_the_datamodule_on_the_device(tmp_path):
    """configure_model runs inside the strategy's device context: the network is still
    built on the CPU from the CPU generator (theta_0 equals the eagerly built CPU
    network's bit for bit), then trained on the device into a store the recorder creates;
    the torchmetrics accuracies are those of the final network on the validation data."""
    torch.manual_seed(0)
    eager = ExpertTrajectoryModule("ConvNet", channels=1, num_classes=3, image_size=8,
                                   model_kwargs={"width": 4, "depth": 2})
    init = flatten_parameters(eager.net).detach().clone()
    torch.manual_seed(0)
    module = ExpertTrajectoryModule("ConvNet", model_kwargs={"width": 4, "depth": 2},
                                    lr=0.05, dsa_seed=5)
    trainer = _trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[
        GSAM(rho=0.05, alpha=0.3), TrajectoryRecorder(str(tmp_path / "store"))])
    trainer.fit(module, datamodule=_TinyData())
    store = TrajectoryStore.open(tmp_path / "store")
    assert store.validate(deep=True) == [0] and store.model["image_size"] == [8, 8]
    snaps = store.load_expert(0, mmap=False)
    assert torch.equal(snaps[0], init)
    assert next(module.net.parameters()).device.type == DEVICE.type
    assert module.val_acc.tp.device.type == DEVICE.type
    x, y = tiny_data(per_class=4, seed=1)
    with torch.no_grad():
        hand = (module.net(x.to(DEVICE)).argmax(1).cpu() == y).float().mean().item()
    assert trainer.logged_metrics["val/acc"].item() == pytest.approx(hand, abs=1e-6)
