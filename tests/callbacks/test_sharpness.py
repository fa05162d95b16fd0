"""SAM / ASAM / GSAM callbacks inside a real pl.Trainer against hand-computed steps
(docs/method.md, 'Flat experts (FTD, GSAM)').

The reference steps below use explicit ``torch.autograd.grad`` calls in float64 and never
the library's functional helpers, so the tests are independent of the implementation.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks.sharpness import ASAM, GSAM, SAM, SharpnessAware

LR = 0.1
EPS = 1e-12


# ---------------------------------------------------------------------- fixtures
def _data(n=8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen)


class Tiny(pl.LightningModule):
    """Follows the loss protocol: sets ``self.loss_closure`` in training_step."""

    def __init__(self, net=None, batch_size=8, n=8, set_closure=True, skip_step=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = net if net is not None else nn.Linear(3, 2)
        self.batch_size, self.n = batch_size, n
        self.set_closure, self.skip_step = set_closure, skip_step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.set_closure:
            self.loss_closure = lambda: F.cross_entropy(self(x), y)
        if self.skip_step:
            return None
        return F.cross_entropy(self(x), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data(self.n)), batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class GradRecorder(pl.Callback):
    """Placed after the sharpness callback: records weights and the gradient it leaves."""

    def __init__(self):
        self.before, self.grads, self.after = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append([p.detach().clone() for p in pl_module.parameters()])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([p.detach().clone() for p in pl_module.parameters()])


def _fit(module, callbacks=(), max_steps=1, **kw):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(module)
    return trainer


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ---------------------------------------------------------------------- hand reference
def _loss_at(net, flat_w, x, y):
    params, offset = {}, 0
    for name, p in net.named_parameters():
        params[name] = flat_w[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return F.cross_entropy(functional_call(net, params, (x,)), y)


def _grad(net, flat_w, x, y):
    w = flat_w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_at(net, w, x, y), [w])
    return g


def _hand_perturbation(w, g, rho, adaptive):
    if adaptive:
        return rho * w * w * g / (torch.sqrt(((w.abs() * g) ** 2).sum()) + EPS)
    return rho * g / (torch.sqrt((g**2).sum()) + EPS)


def _hand_final(g, gp, alpha):
    ng, ngp = torch.sqrt((g**2).sum()), torch.sqrt((gp**2).sum())
    cos = (g * gp).sum() / (ng * ngp + EPS)
    g_perp = g - cos * ng * gp / (ngp + EPS)
    return gp - alpha * g_perp


def _hand_step(net, flat_w, x, y, rho, alpha, adaptive, lr=LR):
    """One SAM/ASAM/GSAM + SGD step (docs/method.md, 'Flat experts (FTD, GSAM)') in
    float64; returns (w_new, final)."""
    net = copy.deepcopy(net).double()
    w = flat_w.double()
    x = x.double()
    g = _grad(net, w, x, y)
    e = _hand_perturbation(w, g, rho, adaptive)
    gp = _grad(net, w + e, x, y)
    final = _hand_final(g, gp, alpha)
    return w - lr * final, final


# ---------------------------------------------------------------------- steps
@pytest.mark.parametrize(
    ("cb", "rho", "alpha", "adaptive"),
    [
        (GSAM(rho=0.5, alpha=0.3), 0.5, 0.3, True),
        (GSAM(rho=0.2, alpha=0.6, adaptive=False), 0.2, 0.6, False),
        (ASAM(rho=1.0), 1.0, 0.0, True),
        (SAM(rho=0.2), 0.2, 0.0, False),
    ],
    ids=["gsam", "gsam-nonadaptive", "asam", "sam"],
)
def test_one_step_equals_hand_computed(cb, rho, alpha, adaptive):
    module = Tiny()
    w0 = _flat(module).clone()
    x, y = _data()
    expected, _ = _hand_step(module.net, w0, x, y, rho, alpha, adaptive)
    sgd, _ = _hand_step(module.net, w0, x, y, 0.0, 0.0, False)
    _fit(module, [cb])
    got = _flat(module).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the sharpness-aware step is measurably different from plain SGD
    assert (expected - sgd).abs().max() > 1e-4
    assert module.loss_closure is None  # consumed by the callback


def test_asam_differs_from_sam_with_the_same_rho():
    x, y = _data()
    results = {}
    for name, cb in {"sam": SAM(rho=0.5), "asam": ASAM(rho=0.5)}.items():
        module = Tiny()
        w0 = _flat(module).clone()
        _fit(module, [cb])
        results[name] = _flat(module).double()
    w0_module = Tiny()
    asam_hand, _ = _hand_step(w0_module.net, w0, x, y, 0.5, 0.0, True)
    sam_hand, _ = _hand_step(w0_module.net, w0, x, y, 0.5, 0.0, False)
    torch.testing.assert_close(results["asam"], asam_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(results["sam"], sam_hand, rtol=0, atol=1e-6)
    assert (results["asam"] - results["sam"]).abs().max() > 1e-4


def test_sam_rho_zero_equals_plain_sgd_exactly():
    plain, sam = Tiny(batch_size=4), Tiny(batch_size=4)
    assert torch.equal(_flat(plain), _flat(sam))
    _fit(plain, max_steps=2)
    _fit(sam, [SAM(rho=0.0)], max_steps=2)
    assert torch.equal(_flat(plain), _flat(sam))


def test_weights_after_step_are_exactly_sgd_of_the_final_gradient():
    """Restoration is exact: w_new is SGD's step from the restored w with the final
    gradient, bit for bit, over several steps. (The reference step is SGD itself on a
    copy: ``w - lr * g`` rounds twice where SGD's fused update may round once.)"""
    module = Tiny(net=nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), batch_size=4)
    rec = GradRecorder()
    _fit(module, [GSAM(rho=0.3, alpha=0.3), rec], max_steps=2)
    assert len(rec.grads) == 2
    for before, grads, after in zip(rec.before, rec.grads, rec.after, strict=True):
        copies = [w.clone().requires_grad_(True) for w in before]
        for c, g in zip(copies, grads, strict=True):
            c.grad = g.clone()
        torch.optim.SGD(copies, lr=LR).step()
        for c, w, g, w_new in zip(copies, before, grads, after, strict=True):
            assert torch.equal(w_new, c.detach())
            torch.testing.assert_close(w_new, w - LR * g, rtol=0, atol=1e-7)


def test_gradient_clipping_applies_to_the_final_gradient():
    module = Tiny()
    w0 = _flat(module).clone()
    x, y = _data()
    _, final = _hand_step(module.net, w0, x, y, 0.5, 0.3, True)
    clip = 0.05
    norm = torch.sqrt((final**2).sum())
    assert norm > 2 * clip  # clipping is active
    expected = w0.double() - LR * final * (clip / (norm + 1e-6))
    rec = GradRecorder()
    _fit(module, [GSAM(rho=0.5, alpha=0.3), rec], gradient_clip_val=clip)
    torch.testing.assert_close(_flat(module).double(), expected, rtol=0, atol=1e-6)
    # the recorder (after GSAM, before clipping) saw the unclipped final gradient
    seen = torch.cat([g.reshape(-1) for g in rec.grads[0]]).double()
    torch.testing.assert_close(seen, final, rtol=0, atol=1e-6)


def test_batchnorm_statistics_updated_once():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    x, _ = _data()
    reference = net().train()
    with torch.no_grad():
        reference(x)  # one plain forward = one statistics update
    ref_bn = reference[1]
    module = Tiny(net=net())
    _fit(module, [GSAM(rho=0.5, alpha=0.3)])
    bn = module.net[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, torch.zeros(4))


def test_skipped_step_is_ignored():
    module = Tiny(skip_step=True)
    w0 = _flat(module).clone()
    _fit(module, [GSAM()], max_steps=1, max_epochs=1)
    assert torch.equal(_flat(module), w0)
    assert module.loss_closure is None


# ---------------------------------------------------------------------- refusals
def test_sixteen_mixed_refused():
    # a GradScaler (Lightning turns 16-mixed into bf16-mixed on a CPU: the plugin keeps it)
    from pytorch_lightning.plugins.precision import MixedPrecision

    with pytest.raises(RuntimeError, match=r"precision='16-mixed'.*GradScaler"):
        _fit(Tiny(), [GSAM()], plugins=[MixedPrecision("16-mixed", "cpu")])


def _autocast_grad(net, flat_w, x, y):
    w = flat_w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss_at(net, w, x, y)
    (g,) = torch.autograd.grad(loss, [w])
    return g


@pytest.mark.parametrize(("cb", "rho", "alpha", "adaptive"),
                         [(GSAM(rho=0.5, alpha=0.3), 0.5, 0.3, True),
                          (SAM(rho=0.2), 0.2, 0.0, False)], ids=["gsam", "sam"])
def test_bf16_mixed_both_passes_under_autocast(cb, rho, alpha, adaptive):
    """Under bf16-mixed both passes run in bfloat16 autocast (the second inside the
    precision plugin's context) and the update is float32: the step equals the hand step
    whose two gradients are taken under the same autocast, and is within bfloat16's
    precision of the float64 step."""
    module = Tiny(net=nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)))
    w0 = _flat(module).clone()
    x, y = _data()
    g = _autocast_grad(module.net, w0, x, y)
    e = _hand_perturbation(w0, g, rho, adaptive)
    final = _hand_final(g, _autocast_grad(module.net, w0 + e, x, y), alpha)
    expected = w0 - LR * final
    exact, _ = _hand_step(module.net, w0, x, y, rho, alpha, adaptive)
    sgd, _ = _hand_step(module.net, w0, x, y, 0.0, 0.0, False)
    _fit(module, [cb], precision="bf16-mixed")
    got = _flat(module)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the bf16 pass changes the step by much less than the sharpness-aware update does
    assert (got.double() - exact).abs().max() < 0.1 * (exact - sgd).abs().max()
    # and bf16 did change the step (the comparison above can tell the passes apart)
    assert (got.double() - exact).abs().max() > 1e-6


def test_accumulation_refused():
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2"):
        _fit(Tiny(batch_size=4), [SAM()], accumulate_grad_batches=2)


def test_module_without_loss_closure_refused():
    with pytest.raises(RuntimeError, match=r"loss protocol.*loss_closure"):
        _fit(Tiny(set_closure=False), [ASAM()])


def test_manual_optimization_refused():
    module = Tiny()
    module.automatic_optimization = False
    with pytest.raises(RuntimeError, match="automatic optimization"):
        _fit(module, [GSAM()])


def test_two_sharpness_callbacks_refused():
    with pytest.raises(RuntimeError, match="more than one"):
        _fit(Tiny(), [SAM(), GSAM()])


def test_bad_hyperparameters_refused():
    with pytest.raises(ValueError, match="rho"):
        SAM(rho=-0.1)
    with pytest.raises(ValueError, match="adaptive"):
        SharpnessAware(rho=0.1, adaptive="yes")


# ---------------------------------------------------------------------- state
def test_defaults_and_state_dict_round_trip():
    assert (SAM().rho, SAM().alpha, SAM().adaptive) == (0.05, 0.0, False)
    assert (ASAM().rho, ASAM().alpha, ASAM().adaptive) == (0.5, 0.0, True)
    assert (GSAM().rho, GSAM().alpha, GSAM().adaptive) == (0.01, 0.3, True)
    state = GSAM(rho=0.02, alpha=0.1).state_dict()
    assert state == {"rho": 0.02, "alpha": 0.1, "adaptive": True, "eps": 1e-12}
    same = GSAM(rho=0.02, alpha=0.1)
    same.load_state_dict(state)
    assert same.state_dict() == state
    other = GSAM()
    with pytest.warns(UserWarning, match="resuming with the checkpoint"):
        other.load_state_dict(state)
    assert other.state_dict() == state


# ---------------------------------------------------------------------- DDP
_SCRIPT = Path(__file__).with_name("ddp_gsam_script.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("ddp_gsam_script", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_ddp_two_processes_identical_and_equal_hand_simulation(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(_SCRIPT), str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = _load_script()
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] == s.STEPS
    assert torch.equal(r0["final"], r1["final"])  # both ranks stepped identically
    assert torch.equal(r0["init"], r1["init"])

    # single-process simulation: mean of the ranks' g, shared e, mean of the ranks' finals
    net = s.make_net().double()
    data = [s.make_data(r) for r in range(2)]
    w = r0["init"].double()
    for step in range(s.STEPS):
        sl = slice(step * s.BATCH, (step + 1) * s.BATCH)
        batches = [(x[sl].double(), y[sl]) for x, y in data]
        g = sum(_grad(net, w, xb, yb) for xb, yb in batches) / 2
        e = _hand_perturbation(w, g, s.RHO, adaptive=True)
        finals = [_hand_final(g, _grad(net, w + e, xb, yb), s.ALPHA) for xb, yb in batches]
        w = w - s.LR * (finals[0] + finals[1]) / 2
    torch.testing.assert_close(r0["final"].double(), w, rtol=0, atol=1e-6)
    assert (w - r0["init"].double()).abs().max() > 1e-3
