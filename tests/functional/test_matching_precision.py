"""The matching loss under bf16 autocast (docs/method.md, 'Mixed precision'): its gradients
against a float64 unroll written here, for each gradient mode, at a CIFAR shape (3x32x32)
and a 28x28 one; the recompute/tesla backward replays in bfloat16; what must stay float32
does (the loss, the distance, theta, the gradients, DSA's sampling grid), with a bound
that a bfloat16 distance breaks."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lightning_distill.data.augment import DSA
from lightning_distill.functional import (
    classification_loss,
    sample_minibatches,
    trajectory_matching_loss,
)
from lightning_distill.models import ParamSpec, build_model, flatten_parameters

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SHAPES = {"cifar": (3, 32), "mnist": (1, 28)}
N_IMG, K, STEPS, BATCH = 8, 4, 4, 4


def _problem(shape: str, near: float = 0.0):
    """A tiny matching problem in float32; ``near`` > 0 puts the target that close to
    the start (relative to the parameters' size) and takes a small syn_lr, so that
    theta_N - target is small against theta: the case a bfloat16 distance gets wrong."""
    channels, size = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model("ConvNet", channels=channels, num_classes=K, image_size=size,
                        width=8, depth=3)
    g = torch.Generator().manual_seed(1)
    start = flatten_parameters(model).detach().clone()
    scale = near if near else 0.05
    target = start + scale * start.abs().mean() * torch.randn(start.shape, generator=g)
    images = torch.randn(N_IMG, channels, size, size, generator=g)
    labels = 2.0 * torch.randn(N_IMG, K, generator=g)
    syn_lr = torch.tensor(0.002 if near else 0.01)
    batches = sample_minibatches(N_IMG, BATCH, STEPS, torch.Generator().manual_seed(2))
    return model, start, target, images, labels, syn_lr, batches


def _leaves(images, labels, syn_lr, dtype=torch.float32):
    return [t.detach().to(dtype).requires_grad_(True) for t in (images, labels, syn_lr)]


def _reference(model, start, target, images, labels, syn_lr, batches, dsa):
    """A naive float64 unroll (every step's graph kept), its loss and gradients."""
    model = model.double()
    spec = ParamSpec.of(model)
    x, y, lr = _leaves(images, labels, syn_lr, torch.float64)
    theta = start.double().requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    for idx in batches:
        xb = x[idx]
        if dsa is not None:
            xb = dsa.apply(xb, dsa.sample(xb, gen))
        out = functional_call(model, spec.unflatten(theta), (xb,))
        (g,) = torch.autograd.grad(classification_loss(out, y[idx]), theta, create_graph=True)
        theta = theta - lr * g
    t, s = target.double(), start.double()
    loss = (theta - t).square().sum() / (s - t).square().sum()
    loss.backward()
    return loss.detach(), [v.grad for v in (x, y, lr)]


def _bf16(mode, model, start, target, images, labels, syn_lr, batches, dsa):
    x, y, lr = _leaves(images, labels, syn_lr)
    with torch.autocast(**BF16):
        loss = trajectory_matching_loss(model, start, target, x, y, lr, batches, dsa, mode,
                                        generator=torch.Generator().manual_seed(3))
    loss.backward()  # outside autocast, as a Trainer's manual_backward may be
    return loss.detach(), [v.grad for v in (x, y, lr)]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(
        a.double().flatten(), b.double().flatten(), dim=0))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
def test_bf16_gradients_match_float64(shape, mode):
    problem = _problem(shape)
    dsa = DSA("scale_rotate_crop")
    ref_loss, ref = _reference(*problem, dsa)
    loss, got = _bf16(mode, *problem, dsa)
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got)
    assert abs(float(loss) - float(ref_loss)) <= 0.01 * float(ref_loss)
    if mode == "tesla":  # approximate by design: against float32 tesla, not the exact unroll
        _, ref = _float32("tesla", *problem, dsa)
    for name, g, r in zip(("images", "labels", "syn_lr"), got, ref, strict=True):
        assert _cos(g, r) > 0.99, (name, _cos(g, r))
        assert _rel(g, r) < 0.15, (name, _rel(g, r))


def _float32(mode, model, start, target, images, labels, syn_lr, batches, dsa):
    x, y, lr = _leaves(images, labels, syn_lr)
    loss = trajectory_matching_loss(model, start, target, x, y, lr, batches, dsa, mode,
                                    generator=torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [v.grad for v in (x, y, lr)]


@pytest.mark.parametrize("mode", ["recompute", "tesla"])
def test_backward_replays_in_bf16(mode):
    """The recompute/tesla backward recomputes the steps under the forward's autocast,
    even when ``backward`` is called outside it: every convolution it runs is bf16."""
    model, *rest = _problem("mnist")
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    x, y, lr = _leaves(*rest[2:5])
    with torch.autocast(**BF16):
        loss = trajectory_matching_loss(model, rest[0], rest[1], x, y, lr, rest[5], None, mode)
    forward = len(seen)
    loss.backward()
    for h in hooks:
        h.remove()
    assert forward > 0 and len(seen) > forward
    assert set(seen) == {torch.bfloat16}
    # and without autocast nothing is bf16 (the hook does see the difference)
    seen.clear()
    x, y, lr = _leaves(*rest[2:5])
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    trajectory_matching_loss(model, rest[0], rest[1], x, y, lr, rest[5], None, mode).backward()
    for h in hooks:
        h.remove()
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
def test_distance_stays_float32(mode):
    """The leak test: with the target close to the start (the distance small against the
    parameters), the loss under bf16 autocast is within 1% of the float64 one, while the
    same loss with theta, snapshots and distance in bfloat16 is off by more than 5%."""
    problem = _problem("mnist", near=0.005)
    model, start, target = problem[:3]
    ref_loss, _ = _reference(*problem, None)
    loss, _ = _bf16(mode, *problem, None)
    assert abs(float(loss) - float(ref_loss)) <= 0.01 * float(ref_loss)
    # the leak this guards against: the same unroll with theta, the snapshots and the
    # distance in bfloat16 (what bf16 leaves make of it) is off by far more than the bound
    x, y, lr = _leaves(*problem[3:6], torch.bfloat16)
    leaked = trajectory_matching_loss(model, start, target, x, y, lr, problem[6], None, mode)
    assert leaked.dtype == torch.bfloat16
    assert abs(float(leaked) - float(ref_loss)) > 0.05 * float(ref_loss)


def test_soft_label_softmax_and_dsa_grid_stay_float32():
    # soft cross-entropy on bf16 logits: the same as on their float32 values, to float32
    logits = torch.randn(5, K).bfloat16()
    target = torch.randn(5, K) * 3
    with torch.autocast(**BF16):
        got = classification_loss(logits, target)
    want = classification_loss(logits.float(), target)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=0)
    # DSA's scale/rotate: bit-identical with and without autocast
    dsa = DSA("scale_rotate")
    x = torch.randn(6, 3, 32, 32)
    for _ in range(4):
        p = dsa.sample(x, torch.Generator().manual_seed(_))
        with torch.autocast(**BF16):
            a = dsa.apply(x, p)
        assert a.dtype == torch.float32 and torch.equal(a, dsa.apply(x, p))
