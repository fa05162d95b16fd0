"""DistillationModule (docs/method.md, 'Matching loss'): exact steps, window, threshold, label init,
resume, errors before training, guards, and a 2-process DDP run."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import TensorDataset

from lightning_distill.callbacks.ema import SyntheticEMA
from lightning_distill.callbacks.iteration_checkpoint import IterationCheckpoint
from lightning_distill.callbacks.matching_window import MatchingWindow
from lightning_distill.data.augment import DSA
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.matching import (
    parameter_mask,
    sample_minibatches,
    trajectory_matching_loss,
)
from lightning_distill.models.params import ParamSpec
from lightning_distill.modules.distill import DistillationModule
from lightning_distill.seeding import derive_seed
from lightning_distill.trajectories import TrajectoryStoreError
from tests.helpers import (
    CrashAt,
    build_tiny_store,
    distill_resume_setup,
    init_distill_module,
    make_distill_module,
    quiet_trainer,
    tiny_data,
    tiny_model,
    write_store,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """2 experts x 5 snapshots (epochs 0..4) of the tiny ConvNet."""
    path = tmp_path_factory.mktemp("store") / "experts"
    build_tiny_store(path, experts=2, epochs=4)
    return path


@pytest.fixture(scope="module")
def one_expert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("store1") / "experts"
    build_tiny_store(path, experts=1, epochs=3, seed=3)
    return path


def replay_loss(module, generator, images, labels, syn_lr, window=None, it=0, **kw):
    """One iteration's matching loss, drawing from ``generator`` in the module's order
    (``kw``: param_mask / match for trajectory_matching_loss)."""
    hp = module.hparams
    experts = module.store.expert_indices()
    expert = experts[int(torch.randint(len(experts), (1,), generator=generator))]
    if window is not None:
        start = window.sample(it, generator)
    else:
        start = int(torch.randint(0, hp.max_start_epoch, (1,), generator=generator))
    dt = images.dtype
    theta0 = module.store.snapshot(expert, start).to(dt)
    target = module.store.snapshot(expert, start + hp.expert_epochs).to(dt)
    n = images.shape[0]
    batches = sample_minibatches(n, hp.batch_syn or n, hp.syn_steps, generator)
    aug = DSA(hp.dsa_strategy, flip=hp.dsa_flip) if hp.dsa else None
    net = tiny_model(module.store.model)
    return trajectory_matching_loss(net, theta0, target, images, labels, syn_lr, batches,
                                    augment=aug, mode=hp.mode, generator=generator, **kw), start


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.is_floating_point())


# ------------------------------------------------------------------ exact first step
def _assert_first_step_is_minus_lr_grad(module, x0, y0, lr0, **kw):
    """Replay the first iteration by hand (``kw`` for trajectory_matching_loss) and check
    that the module's first update was -lr * grad (SGD with momentum, empty buffers).
    Returns the replay's leaves and generator."""
    g = torch.Generator().manual_seed(derive_seed(7, 0x5EED, 0))
    x, y, lr = leaf(x0), leaf(y0), leaf(lr0)
    # "64-true" runs the step with float64 as the default dtype, which DSA's draws follow
    with default_dtype(torch.float64):
        loss, _ = replay_loss(module, g, x, y, lr, **kw)
    loss.backward()
    hp = module.hparams
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.images.detach(), x0 - hp.lr_img * x.grad, **tol)
    torch.testing.assert_close(module.labels.detach(), y0 - hp.lr_y * y.grad, **tol)
    torch.testing.assert_close(module.syn_lr.detach(), lr0 - hp.lr_lr * lr.grad, **tol)
    return x, y, lr, g


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
def test_first_iteration_is_minus_lr_times_grad(store_dir, mode):
    module = init_distill_module(make_distill_module(store_dir, iterations=1, learn_labels=True,
                                                     mode=mode))
    x0, y0, lr0 = (module.images.detach().double().clone(), module.labels.detach().double()
                   .clone(), module.syn_lr.detach().double().clone())
    quiet_trainer(precision="64-true").fit(module)
    assert int(module.iteration) == 1 and int(module.skipped) == 0
    assert module.images.dtype == torch.float64

    x, y, lr, g = _assert_first_step_is_minus_lr_grad(module, x0, y0, lr0)
    assert x.grad.abs().max() > 0 and y.grad.abs().max() > 0 and lr.grad.abs() > 0
    # the generator advanced exactly as in the replay
    assert torch.equal(module.generator.get_state(), g.get_state())


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
@pytest.mark.parametrize("selection", [dict(param_drop_ratio=0.5),
                                       dict(param_mask=["classifier"]),
                                       dict(match="closest"),
                                       dict(match="closest", param_drop_ratio=0.3)])
def test_first_iteration_with_pad_and_att_options(store_dir, mode, selection):
    """The module's options reach trajectory_matching_loss: its first update equals
    -lr * grad of the loss with the same mask / match rule, computed by hand."""
    module = init_distill_module(make_distill_module(store_dir, iterations=1, learn_labels=True,
                                                     mode=mode, syn_steps=4, **selection))
    x0, y0, lr0 = (t.detach().double().clone() for t in (module.images, module.labels,
                                                           module.syn_lr))
    seen = {}
    original = module.matching_loss

    def spy(it):
        loss, info = original(it)
        seen.update(info)
        return loss, info

    module.matching_loss = spy
    quiet_trainer(precision="64-true").fit(module)
    net = tiny_model(module.store.model)
    kw = {"match": selection.get("match", "last")}
    if "param_mask" in selection:
        kw["param_mask"] = parameter_mask(net, layers=selection["param_mask"])
    elif "param_drop_ratio" in selection:
        kw["param_mask"] = parameter_mask(net, drop_ratio=selection["param_drop_ratio"])
    _assert_first_step_is_minus_lr_grad(module, x0, y0, lr0, **kw)
    hp = module.hparams
    assert ("matched_step" in seen) == (kw["match"] == "closest")
    if "matched_step" in seen:
        assert 1 <= seen["matched_step"] <= hp.syn_steps


def test_selection_options_are_validated(store_dir):
    with pytest.raises(ValueError, match="not both"):
        make_distill_module(store_dir, param_mask=["classifier"], param_drop_ratio=0.5)
    with pytest.raises(ValueError, match="match must be one of"):
        make_distill_module(store_dir, match="nearest")
    with pytest.raises(ValueError, match="names no parameter"):
        make_distill_module(store_dir, param_mask=["head"])
    with pytest.raises(ValueError, match=r"drop_ratio must be in \[0, 1\)"):
        make_distill_module(store_dir, param_drop_ratio=1.5)
    module = make_distill_module(store_dir, param_drop_ratio=0.25)
    assert module.param_mask.dtype == torch.bool and "param_mask" not in module.state_dict()
    assert make_distill_module(store_dir).param_mask is None


def test_first_iteration_single_trajectory_no_dsa(one_expert_dir):
    """One expert, one possible start epoch, no DSA: only the minibatches are random."""
    module = init_distill_module(make_distill_module(
        one_expert_dir, iterations=1, max_start_epoch=1, dsa=False, batch_syn=None,
        learn_labels=True))
    x0, y0, lr0 = (t.detach().double().clone() for t in (module.images, module.labels,
                                                           module.syn_lr))
    quiet_trainer(precision="64-true").fit(module)
    x, y, lr = leaf(x0), leaf(y0), leaf(lr0)
    st = module.store
    batches = [torch.arange(6)] * 3  # batch_syn=None: the whole set each step (any order)
    loss = trajectory_matching_loss(tiny_model(), st.snapshot(0, 0).double(),
                                    st.snapshot(0, 2).double(), x, y, lr, batches)
    loss.backward()
    hp = module.hparams
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(module.images.detach(), x0 - hp.lr_img * x.grad, **tol)
    torch.testing.assert_close(module.labels.detach(), y0 - hp.lr_y * y.grad, **tol)
    torch.testing.assert_close(module.syn_lr.detach(), lr0 - hp.lr_lr * lr.grad, **tol)


# ---------------------------------------------------------------------- the window
def test_module_samples_from_callback_window(store_dir):
    window = MatchingWindow(min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=3,
                            expansion_end=4, sequential=True)
    calls = []
    original = window.sample

    def spy(it, generator=None):
        t = original(it, generator)
        calls.append((it, t, window.last_upper_bound))
        return t

    window.sample = spy
    module = init_distill_module(make_distill_module(store_dir, iterations=6, max_start_epoch=3,
                                                     dsa=False))
    quiet_trainer(callbacks=[window]).fit(module)
    assert [c[0] for c in calls] == list(range(6))
    # UB = min(3, 2 + floor(1 * it / 4)): 2, 2, 2, 2, 3, 3
    assert [c[2] for c in calls] == [2, 2, 2, 2, 3, 3]
    assert all(1 <= t < ub for _, t, ub in calls)
    assert {t for it, t, _ in calls if it < 4} == {1}
    # replaying the generator reproduces the module's start epochs
    g = torch.Generator().manual_seed(derive_seed(7, 0x5EED, 0))
    fresh = MatchingWindow(1, 2, 3, 4, True)
    x = module.images.detach().clone()  # values do not matter for the draws
    for it in range(6):
        with torch.no_grad():
            _, start = replay_loss(module, g, x, module.labels.detach(),
                                   module.syn_lr.detach(), fresh, it)
        assert start == calls[it][1]


# ------------------------------------------------------------------- threshold skip
class _Snapshot(Callback):
    """Before iteration ``at``: set the threshold and copy every parameter/optimizer state."""

    def __init__(self, at: int, threshold: float) -> None:
        self.at, self.threshold = at, threshold
        self.before = self.after = None

    @staticmethod
    def _state(trainer, module):
        return (copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()}),
                [copy.deepcopy(o.state_dict()) for o in trainer.optimizers])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.iteration) == self.at:
            module.hparams.threshold = self.threshold
            self.before = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.iteration) == self.at + 1:
            self.after = self._state(trainer, module)


def test_threshold_skip_leaves_parameters_and_momentum_unchanged(store_dir):
    snap = _Snapshot(at=2, threshold=-1.0)
    ema = SyntheticEMA(decay=0.5)
    module = init_distill_module(make_distill_module(store_dir, iterations=3, learn_labels=True))
    quiet_trainer(callbacks=[snap, ema]).fit(module)
    (sd0, opt0), (sd1, opt1) = snap.before, snap.after
    # two iterations stepped: momentum buffers exist for images, syn_lr and labels (ONE
    # optimizer, a parameter group each)
    ((o0,), (o1,)) = opt0, opt1
    bufs = [o0["state"][k]["momentum_buffer"] for k in range(3)]
    assert len(o0["param_groups"]) == 3 and all(b.abs().max() > 0 for b in bufs)
    for name in ("images", "labels", "syn_lr"):
        assert torch.equal(sd0[name], sd1[name]), name
    assert sorted(o0["state"]) == sorted(o1["state"]) == [0, 1, 2]
    for k in range(3):
        assert torch.equal(o0["state"][k]["momentum_buffer"], o1["state"][k]["momentum_buffer"])
    assert int(sd0["skipped"]) == 0 and int(sd1["skipped"]) == 1
    assert int(sd1["nonfinite_streak"]) == 0  # a threshold skip is not a non-finite one
    assert int(module.iteration) == 3
    assert ema.num_updates == 2  # the EMA follows only the steps taken


# ------------------------------------------------------------------------ label init
def _crafted_expert(bias: list[float], snapshots: int = 4) -> torch.Tensor:
    """Final snapshot: zero conv/norm/classifier weights, classifier bias ``bias``
    (logits = bias for every image). Earlier snapshots are NaN (never read by the init)."""
    spec = ParamSpec.of(tiny_model())
    final = torch.zeros(spec.total)
    spec.unflatten(final)["classifier.bias"].copy_(torch.tensor(bias))
    snaps = torch.full((snapshots, spec.total), float("nan"))
    snaps[-1] = final
    return snaps


def test_soft_label_init_mean_over_correct_experts(tmp_path):
    biases = [[3.0, 1.0, 0.0],   # predicts class 0
              [0.0, 2.0, 1.0],   # predicts 1
              [2.0, -1.0, 1.5],  # predicts 0
              [0.5, 0.0, 1.0]]   # predicts 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(tmp_path / "s", [_crafted_expert(b) for b in biases])
    b = torch.tensor(biases)
    x, y = tiny_data()

    module = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, learn_labels=True,
                                label_experts=4)
    module.initialize(train_images=x, train_labels=y)
    expected = torch.stack([(b[0] + b[2]) / 2, b[1], b[3]]).repeat_interleave(2, 0)
    torch.testing.assert_close(module.labels.detach(), expected, rtol=0, atol=1e-6)

    # only the first 3 experts: nobody predicts class 2 -> mean over all of them
    module = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, label_init="soft",
                                label_experts=3)
    with pytest.warns(UserWarning, match="classified correctly by no expert"):
        module.initialize(train_images=x, train_labels=y)
    assert not module.labels.requires_grad  # soft labels, not learnable: a buffer
    expected = torch.stack([(b[0] + b[2]) / 2, b[1], b[:3].mean(0)]).repeat_interleave(2, 0)
    torch.testing.assert_close(module.labels, expected, rtol=0, atol=1e-6)


def test_image_init_real_and_predicted_correctly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(tmp_path / "s", [_crafted_expert([0.0, 2.0, 1.0])])  # predicts class 1
    x, y = tiny_data()
    real = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, seed=3)
    real.initialize(train_images=x, train_labels=y)
    # each synthetic image is a real image of its class; hard labels are class ids
    assert torch.equal(real.labels, torch.arange(3).repeat_interleave(2))
    for img, c in zip(real.images.detach(), real.labels, strict=True):
        match = (x == img).flatten(1).all(1).nonzero().flatten()
        assert match.numel() == 1 and int(y[match]) == int(c)
    spc = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, seed=3,
                             image_init="samples_predicted_correctly")
    with pytest.warns(UserWarning, match="classifies 2 images of class 0 correctly .at most 0"):
        spc.initialize(train_images=x, train_labels=y)
    # class 1 is always right, the others are filled in permutation order: same as real
    assert torch.equal(spc.images, real.images)
    noise = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, image_init="noise")
    noise.initialize(train_images=x, train_labels=y)
    assert abs(float(noise.images.std()) - 1.0) < 0.3 and not torch.equal(noise.images, real.images)


# ------------------------------------------------------------------------- resume
def _state(module, trainer, ema):
    return {"images": module.images.detach().clone(), "labels": module.labels.detach().clone(),
            "syn_lr": module.syn_lr.detach().clone(), "iteration": int(module.iteration),
            "generator": module.generator.get_state(), "ema": ema.average.clone(),
            "ema_updates": ema.num_updates,
            "opts": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]}


@pytest.mark.parametrize("at, checkpoint_first", [(3, False), (3, True), (2, False)])
def test_resume_six_equals_three_plus_three(store_dir, tmp_path, at, checkpoint_first):
    """6 iterations straight == ``at`` iterations, crash, resume in a fresh module, the rest.

    checkpoint_first puts the checkpoint callback before SyntheticEMA (the EMA must not
    depend on callback order); at=2 caught a loader whose length was the remaining
    iterations (the resumed run stopped at iteration 4)."""
    module, callbacks = distill_resume_setup(store_dir)
    init_distill_module(module)
    trainer = quiet_trainer(callbacks=callbacks)
    trainer.fit(module)
    straight = _state(module, trainer, callbacks[1])
    assert straight["iteration"] == 6 and straight["ema_updates"] == 6

    module, callbacks = distill_resume_setup(store_dir)
    init_distill_module(module)
    ckpt = IterationCheckpoint(tmp_path / "ckpt", every_n=at)
    with pytest.raises(KeyError, match="simulated crash"):
        order = [ckpt, *callbacks] if checkpoint_first else [*callbacks, ckpt]
        quiet_trainer(callbacks=[*order, CrashAt(at=at)]).fit(module)
    assert ckpt.last.exists()

    # a fresh process: a new, NOT initialised module; everything comes from the checkpoint
    module, callbacks = distill_resume_setup(store_dir)
    trainer = quiet_trainer(callbacks=callbacks)
    trainer.fit(module, ckpt_path=str(ckpt.last))
    resumed = _state(module, trainer, callbacks[1])
    assert resumed["iteration"] == 6 and resumed["ema_updates"] == 6
    for key in ("images", "labels", "syn_lr", "generator", "ema"):
        assert torch.equal(straight[key], resumed[key]), key
    for a, b in zip(straight["opts"], resumed["opts"], strict=True):
        assert torch.equal(a["state"][0]["momentum_buffer"], b["state"][0]["momentum_buffer"])


def test_resume_refuses_a_different_window(store_dir, tmp_path):
    module, callbacks = distill_resume_setup(store_dir)
    init_distill_module(module)
    ckpt = IterationCheckpoint(tmp_path / "ckpt", every_n=2)
    with pytest.raises(KeyError):
        quiet_trainer(callbacks=[*callbacks, ckpt, CrashAt(at=2)]).fit(module)
    module, _ = distill_resume_setup(store_dir)
    with pytest.raises(ValueError, match="resume with the same window"):
        quiet_trainer(callbacks=[MatchingWindow(0, 2, 3, 4, sequential=True)]).fit(
            module, ckpt_path=str(ckpt.last))


def test_fit_with_datamodule_initialises_and_runs_iterations(store_dir):
    import pytorch_lightning as pl

    x, y = tiny_data()

    class RealDM(pl.LightningDataModule):  # real data; the batches are the module's
        defers_train_loader = True  # the protocol RealDataModule follows

        def __init__(self):
            super().__init__()
            self.train_set = TensorDataset(x, y)

        def train_dataloader(self):
            return self.trainer.lightning_module.train_dataloader()

    module = make_distill_module(store_dir, iterations=4, dsa=False)
    quiet_trainer().fit(module, datamodule=RealDM())
    assert bool(module.initialized) and int(module.iteration) == 4
    reference = init_distill_module(make_distill_module(store_dir, iterations=0))
    assert not torch.equal(module.images, reference.images)  # it trained
    with pytest.raises(RuntimeError, match="not initialised"):
        quiet_trainer().fit(make_distill_module(store_dir))


def test_datamodule_whose_batches_would_drive_the_iterations_is_refused(store_dir):
    import pytorch_lightning as pl

    x, y = tiny_data()

    class BatchesDM(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.train_set = TensorDataset(x, y)

        def train_dataloader(self):  # real batches: must NOT drive the outer iterations
            return torch.utils.data.DataLoader(self.train_set, batch_size=9)

    module = make_distill_module(store_dir, iterations=4, dsa=False)
    with pytest.raises(TypeError, match="would replace the outer iterations"):
        quiet_trainer().fit(module, datamodule=BatchesDM())
    assert int(module.iteration) == 0


def test_package_touches_no_private_lightning_attribute():
    """The modules and callbacks use Lightning's public API only: no fit-loop internals,
    no data-source rewiring, no private Trainer / module attributes."""
    import re
    from pathlib import Path

    import lightning_distill

    root = Path(lightning_distill.__file__).parent
    pattern = re.compile(r"fit_loop\.|_data_source|\btrainer\._[a-z]|\._trainer\b"
                         r"|_logger_connector|_active_loop")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}"
            for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ------------------------------------------------------------------------- errors
def test_corrupt_store_fails_before_training(tmp_path):
    build_tiny_store(tmp_path / "s", experts=2, epochs=4)
    path = tmp_path / "s" / "expert_00001.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the zip directory is gone, the data is still there
    with pytest.raises(TrajectoryStoreError, match="expert_00001.pt is truncated or corrupt"):
        make_distill_module(tmp_path / "s")
    path.write_bytes(data[:200])
    with pytest.raises(TrajectoryStoreError, match="expert_00001.pt is truncated"):
        make_distill_module(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrajectoryStoreError, match="meta.json not found"):
        make_distill_module(tmp_path / "empty")


def test_mismatched_store_fails_before_training(tmp_path, store_dir):
    build_tiny_store(tmp_path / "s", experts=1, epochs=4)
    meta_path = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["width"] = 8  # the stored parameters are width 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TrajectoryStoreError, match="does not match the trajectory store"):
        make_distill_module(tmp_path / "s")
    module = make_distill_module(store_dir)
    with pytest.raises(ValueError, match=r"real images have shape \(1, 9, 9\)"):
        module.initialize(train_images=torch.zeros(18, 1, 9, 9),
                          train_labels=torch.arange(3).repeat_interleave(6))

    class FakeDM:
        train_set = TensorDataset(*tiny_data())
        input_space = {"dataset": "tiny", "normalization": "zca", "zca_fingerprint": "abc"}

    with pytest.raises(ValueError, match="normalization = 'zca' vs 'meanstd'"):
        module.initialize(FakeDM())


def test_ipc_larger_than_class_fails(store_dir):
    module = make_distill_module(store_dir, ipc=7, batch_syn=None)
    x, y = tiny_data()
    with pytest.raises(ValueError, match="ipc=7 but class 0 has only 6 training images"):
        module.initialize(train_images=x, train_labels=y)


def test_window_past_snapshots_fails(store_dir):
    # 5 snapshots (0..4), M = 2: the last start epoch is 2, so T+ = 3 is the most allowed
    make_distill_module(store_dir, max_start_epoch=3)
    with pytest.raises(ValueError, match="runs past the stored snapshots.*needs snapshot 5"):
        make_distill_module(store_dir, max_start_epoch=4)
    with pytest.raises(ValueError, match="runs past the stored snapshots.*needs snapshot 5"):
        module = init_distill_module(make_distill_module(store_dir, max_start_epoch=3))
        quiet_trainer(callbacks=[MatchingWindow(0, 2, 4, 10, True)]).fit(module)
    assert int(module.iteration) == 0


def test_syn_lr_bounds_are_validated(store_dir):
    with pytest.raises(ValueError, match="lr_teacher"):
        make_distill_module(store_dir, lr_teacher=20.0)
    with pytest.raises(ValueError, match="syn_lr_min"):
        make_distill_module(store_dir, syn_lr_min=0.0)
    with pytest.raises(ValueError, match="syn_lr_min"):
        make_distill_module(store_dir, syn_lr_min=0.1, syn_lr_max=0.01)


def test_syn_lr_clamp(store_dir):
    """After a step syn_lr is clamped to [syn_lr_min, syn_lr_max] and the clamp counted."""
    module = init_distill_module(make_distill_module(store_dir, iterations=1, lr_lr=1e4, dsa=False))
    lr0 = module.syn_lr.detach().clone()
    g = torch.Generator().manual_seed(derive_seed(7, 0x5EED, 0))
    x, y, lr = leaf(module.images), module.labels.clone(), leaf(lr0)
    loss, _ = replay_loss(module, g, x, y, lr)
    loss.backward()
    raw = float(lr0 - 1e4 * lr.grad)
    assert not 1e-6 <= raw <= 10.0  # the unclamped step leaves the range
    quiet_trainer().fit(module)
    assert float(module.syn_lr) == pytest.approx(min(max(raw, 1e-6), 10.0), rel=1e-6)
    assert int(module.syn_lr_clamps) == 1
    # the clamp keeps later iterations finite
    module = init_distill_module(make_distill_module(store_dir, iterations=3, lr_lr=1e4, dsa=False))
    quiet_trainer().fit(module)
    assert math.isfinite(float(module.syn_lr)) and int(module.syn_lr_clamps) >= 1


def test_nonfinite_loss_is_skipped_counted_and_stops(store_dir):
    module = init_distill_module(make_distill_module(store_dir, iterations=6, max_nonfinite=3))
    original = module.matching_loss
    bad = {1, 3, 4}  # iteration 2 succeeds and resets the streak

    def flaky(it):
        loss, info = original(it)
        return (loss * float("nan") if it in bad else loss), info

    module.matching_loss = flaky
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            seen.append((int(m.iteration), m.images.detach().clone(), int(m.skipped),
                         int(m.nonfinite_streak)))

    quiet_trainer(callbacks=[Record()]).fit(module)
    assert [s[2:] for s in seen] == [(0, 0), (1, 1), (1, 0), (2, 1), (3, 2), (3, 0)]
    assert torch.equal(seen[0][1], seen[1][1])  # the NaN iteration changed nothing
    assert not torch.equal(seen[1][1], seen[2][1])
    assert torch.isfinite(module.images).all()

    # NaN pixels make every loss non-finite: stop after max_nonfinite in a row
    module = init_distill_module(make_distill_module(store_dir, iterations=10, max_nonfinite=3))
    module.images.data[0] = float("nan")
    with pytest.raises(RuntimeError, match="3 consecutive iterations with a non-finite"):
        quiet_trainer().fit(module)
    assert int(module.skipped) == 3 and int(module.iteration) == 2


def test_export_writes_synthetic_set(store_dir, tmp_path):

    out = tmp_path / "syn.pt"
    module = init_distill_module(make_distill_module(store_dir, iterations=2, learn_labels=True,
                                                     export_path=str(out), seed=7))
    ema = SyntheticEMA(decay=0.5)
    quiet_trainer(callbacks=[ema]).fit(module)
    syn = SyntheticSet.load(out)
    assert torch.equal(syn.images, module.images.detach())
    assert torch.equal(syn.labels, module.labels.detach())
    assert syn.lr == pytest.approx(float(module.syn_lr))
    assert syn.meta["iteration"] == 2 and syn.meta["ipc"] == 2
    # the run it came from: the distillation seed and the library version
    from lightning_distill import __version__

    assert syn.meta["seed"] == 7 and syn.meta["library_version"] == __version__
    ema_set = SyntheticSet.load(tmp_path / "syn_ema.pt")
    torch.testing.assert_close(ema_set.images, ema.average)


# ---------------------------------------------------------------------------- DDP
_SCRIPT = Path(__file__).with_name("ddp_distill_script.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("ddp_distill_script", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_ddp_two_ranks_average_their_trajectory_gradients(tmp_path):
    s = _load_script()
    build_tiny_store(tmp_path / "store", experts=2, epochs=4)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(_SCRIPT), str(tmp_path / "store"), str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    for key in ("images", "syn_lr", "labels", "init_images"):
        assert torch.equal(r0[key], r1[key]), key
    assert r0["iteration"] == r1["iteration"] == s.ITERATIONS
    assert r0["skipped"] == r1["skipped"] == 0 and r0["streak"] == r1["streak"] == 0

    # one process: each iteration, the mean of the two ranks' gradients, each rank drawing
    # from its own generator derive_seed(seed, 0x5EED, rank)
    module = s.make_module(str(tmp_path / "store"))
    gens = [torch.Generator().manual_seed(derive_seed(s.SEED, 0x5EED, r)) for r in range(2)]
    windows = [s.make_window() for _ in range(2)]
    x, y, lr = (leaf(r0["init_images"]), leaf(r0["init_labels"]), leaf(r0["init_syn_lr"]))
    hp = module.hparams
    opts = [torch.optim.SGD([x], lr=hp.lr_img, momentum=hp.img_momentum),
            torch.optim.SGD([lr], lr=hp.lr_lr, momentum=hp.lr_momentum),
            torch.optim.SGD([y], lr=hp.lr_y, momentum=hp.y_momentum)]
    for it in range(s.ITERATIONS):
        grads = []
        for r in range(2):
            for t in (x, y, lr):
                t.grad = None
            loss, _ = replay_loss(module, gens[r], x, y, lr, windows[r], it)
            loss.backward()
            grads.append([t.grad.clone() for t in (x, y, lr)])
        for t, g0, g1 in zip((x, y, lr), *grads, strict=True):
            # rank 1's NaN loss drops its trajectory: the average is over rank 0 alone
            t.grad = g0.clone() if it == s.NAN_ITERATION else (g0 + g1) / 2
        for o in opts:
            o.step()
        lr.data.clamp_(hp.syn_lr_min, hp.syn_lr_max)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["images"], x.detach(), **tol)
    torch.testing.assert_close(r0["labels"], y.detach(), **tol)
    torch.testing.assert_close(r0["syn_lr"], lr.detach(), **tol)
    assert (r0["images"] - r0["init_images"]).abs().max() > 1e-3
    # the checkpoint holds every rank's generator state
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["distill_generator_states"]
    assert states.shape[0] == 2
    for r in range(2):
        assert torch.equal(states[r], gens[r].get_state())
    # averaging really happened: one rank's gradient alone gives something else
    assert not torch.allclose(grads[0][0], grads[1][0])

    # PeriodicEvaluation (runs shared out over the ranks: rank 0 trains runs 0 and 2, rank 1
    # run 1): both ranks hold every run's accuracy, evaluations after iterations 2 and 3,
    # and the last one equals a single-process evaluation of the final set
    assert r0["history"] == r1["history"]
    assert [h["step"] for h in r0["history"]] == [2, s.ITERATIONS]
    final = SyntheticSet.from_dict(r0["synthetic"])
    torch.testing.assert_close(final.images, r0["images"], rtol=0, atol=0)
    assert r0["history"][-1]["accs"] == s.make_evaluation().evaluate(final)
    assert (tmp_path / "best.pt").exists()


def test_soft_label_init_defaults_to_every_expert_of_the_store(tmp_path, caplog):
    """DATM averages over all experts of its buffers: with 12 experts where only the last
    two predict class 2, the default (label_experts=None) must use them (a default of 10
    experts would fall back to the unfiltered mean for class 2)."""
    biases = [[3.0, 1.0, 0.0] if i % 2 else [0.0, 2.0, 1.0] for i in range(10)]
    biases += [[0.0, 0.0, 1.0], [1.0, 0.0, 4.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(tmp_path / "s", [_crafted_expert(b) for b in biases])
    b = torch.tensor(biases)
    x, y = tiny_data()
    module = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, learn_labels=True)
    with caplog.at_level(logging.INFO):
        module.initialize(train_images=x, train_labels=y)
    # the initialisation (seconds to minutes on a large store) is announced and timed
    said = [r.getMessage() for r in caplog.records]
    assert "distill: initialising 2 image(s) per class (real) and soft labels from 12 " \
        "expert(s) ..." in said
    assert any(m.startswith("distill: synthetic set initialised in") for m in said)
    expected = torch.stack([b[1:10:2].mean(0), b[0:10:2].mean(0), b[10:].mean(0)])
    torch.testing.assert_close(module.labels.detach(), expected.repeat_interleave(2, 0),
                               rtol=0, atol=1e-6)


def test_predicted_correctly_goes_on_to_the_next_expert(tmp_path):
    """Expert 0 classifies no image of classes 0 and 2 correctly: DATM's fallback takes
    the next experts (1 predicts class 0, 2 predicts class 2) instead of padding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(tmp_path / "s", [_crafted_expert([0.0, 2.0, 1.0]),   # predicts 1
                                     _crafted_expert([2.0, 0.0, 1.0]),   # predicts 0
                                     _crafted_expert([0.0, 1.0, 2.0])])  # predicts 2
    x, y = tiny_data()
    module = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1,
                                image_init="samples_predicted_correctly")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no padding with misclassified images
        module.initialize(train_images=x, train_labels=y)
    used = []
    for c in range(3):
        logits = torch.stack([module._expert_logits(e, module.images.detach()[2 * c:2 * c + 2])
                              for e in range(3)])
        used.append([e for e in range(3) if bool((logits[e].argmax(1) == c).all())])
    assert used == [[1], [0], [2]]
    # starting at init_expert=2 wraps around the store: class 1 comes from expert 0
    module = DistillationModule(str(tmp_path / "s"), 2, max_start_epoch=1, init_expert=2,
                                image_init="samples_predicted_correctly")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.initialize(train_images=x, train_labels=y)
