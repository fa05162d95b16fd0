"""Tests of trajectory_matching_loss (docs/method.md, sections 'Matching loss' to 'TESLA
approximation'): gradients against central finite differences, recompute == full,
TESLA's approximation, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.data.augment import DSA
from lightning_distill.functional import sample_minibatches, trajectory_matching_loss
from lightning_distill.models import build_model, flatten_parameters

DT = torch.float64
N_IMG, K, STEPS, BATCH = 6, 3, 5, 4


def _net(channels: int = 3):
    torch.manual_seed(0)
    return build_model(
        "ConvNet", channels=channels, num_classes=K, image_size=8, width=4, depth=2
    ).to(DT)


def _problem(soft: bool = True, seed: int = 0, lr: float = 0.05, steps: int = STEPS):
    """A tiny matching problem: start = the net's init, target = start + small noise."""
    model = _net()
    g = torch.Generator().manual_seed(seed)
    start = flatten_parameters(model).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=DT)
    images = torch.randn(N_IMG, 3, 8, 8, generator=g, dtype=DT).requires_grad_(True)
    if soft:
        labels = (2.0 * torch.randn(N_IMG, K, generator=g, dtype=DT)).requires_grad_(True)
    else:
        labels = torch.arange(N_IMG) % K
    syn_lr = torch.tensor(lr, dtype=DT, requires_grad=True)
    batches = sample_minibatches(N_IMG, BATCH, steps, torch.Generator().manual_seed(seed + 1))
    return model, start, target, images, labels, syn_lr, batches


def _loss(prob, images, labels, syn_lr, mode="full", augment=None, aug_seed=7):
    model, start, target, _, _, _, batches = prob
    gen = torch.Generator().manual_seed(aug_seed)
    return trajectory_matching_loss(
        model, start, target, images, labels, syn_lr, batches, augment, mode, generator=gen
    )


def _grads(prob, mode, augment=None):
    _, _, _, images, labels, syn_lr, _ = prob
    for t in (images, labels, syn_lr):
        t.grad = None
    loss = _loss(prob, images, labels, syn_lr, mode, augment)
    loss.backward()
    gy = labels.grad.clone() if labels.requires_grad else None
    return loss.detach(), images.grad.clone(), gy, syn_lr.grad.clone()


def _fd(f, x: torch.Tensor, v: torch.Tensor, h: float = 1e-5) -> float:
    """Central difference (f(x + h v) - f(x - h v)) / 2h, evaluated without a graph."""
    with torch.no_grad():
        return float((f(x + h * v) - f(x - h * v)) / (2 * h))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("mode", ["full", "recompute"])
@pytest.mark.parametrize("soft", [True, False])
def test_gradients_match_finite_differences(mode, soft):
    prob = _problem(soft=soft)
    _, _, _, images, labels, syn_lr, _ = prob
    dsa = DSA()
    _, gx, gy, glr = _grads(prob, mode, dsa)
    g = torch.Generator().manual_seed(3)
    x0, y0, lr0 = images.detach(), labels.detach(), syn_lr.detach()
    for _ in range(2):  # random directions in pixel space
        v = torch.randn(x0.shape, generator=g, dtype=DT)
        fd = _fd(lambda x: _loss(prob, x, y0, lr0, augment=dsa), x0, v)
        assert _rel(fd, float((gx * v).sum())) < 1e-5
    v = torch.zeros_like(x0)
    v[2, 1, 3, 4] = 1.0  # one pixel
    fd = _fd(lambda x: _loss(prob, x, y0, lr0, augment=dsa), x0, v)
    assert _rel(fd, float(gx[2, 1, 3, 4])) < 1e-5
    if soft:
        for _ in range(2):
            v = torch.randn(y0.shape, generator=g, dtype=DT)
            fd = _fd(lambda y: _loss(prob, x0, y, lr0, augment=dsa), y0, v)
            assert _rel(fd, float((gy * v).sum())) < 1e-5
    else:
        assert gy is None
    fd = _fd(lambda lr: _loss(prob, x0, y0, lr, augment=dsa), lr0, torch.ones_like(lr0))
    assert _rel(fd, float(glr)) < 1e-5


@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize("augment", ["dsa", "callable", None])
def test_recompute_equals_full(soft, augment):
    prob = _problem(soft=soft, seed=1)
    aug = {"dsa": DSA(), "callable": lambda x: torch.flip(x, dims=[3]) * 0.9, None: None}[augment]
    full = _grads(prob, "full", aug)
    rec = _grads(prob, "recompute", aug)
    for a, b in zip(full, rec, strict=True):
        if a is None:
            assert b is None
            continue
        assert torch.allclose(a, b, rtol=0, atol=1e-10), (a - b).abs().max()


def test_dsa_sampled_once_per_step_and_replayed():
    """The recompute backward replays the forward's augmentation params, never resamples."""

    class CountingDSA(DSA):
        calls = 0

        def sample(self, x, generator=None, **kw):
            CountingDSA.calls += 1
            return super().sample(x, generator, **kw)

    prob = _problem(seed=2)
    aug = CountingDSA()
    full = _grads(prob, "full", aug)
    assert CountingDSA.calls == STEPS
    CountingDSA.calls = 0
    rec = _grads(prob, "recompute", aug)
    assert CountingDSA.calls == STEPS
    assert torch.allclose(full[1], rec[1], rtol=0, atol=1e-10)
    CountingDSA.calls = 0
    _grads(prob, "tesla", aug)
    assert CountingDSA.calls == STEPS


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
def test_zero_step_size_gives_loss_exactly_one(mode):
    prob = _problem(lr=0.0)
    loss, gx, gy, glr = _grads(prob, mode, DSA())
    assert loss.item() == 1.0
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gy) == 0
    assert glr.item() != 0.0  # the loss still depends on syn_lr


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_tesla_close_at_small_lr_and_departs_at_large_lr():
    """TESLA drops cross-step terms (docs/method.md, 'TESLA approximation'): harmless at
    syn_lr = 0.01, not at 0.5."""
    prob = _problem(lr=0.01, seed=3)
    exact = _grads(prob, "recompute", DSA())
    tesla = _grads(prob, "tesla", DSA())
    assert torch.equal(exact[0], tesla[0])  # same loss value
    assert _cos(exact[1], tesla[1]) > 0.99
    assert _cos(exact[2], tesla[2]) > 0.99
    prob = _problem(lr=0.5, seed=3)
    exact = _grads(prob, "recompute", DSA())
    tesla = _grads(prob, "tesla", DSA())
    assert _cos(exact[1], tesla[1]) < 0.9  # measured 0.80
    assert _cos(exact[2], tesla[2]) < 0.9  # measured 0.74


def test_tesla_syn_lr_gradient_formula():
    """TESLA's syn_lr gradient dL/dsyn_lr = (2/D) <theta_N - target, -G>, G = sum_i g_i."""
    prob = _problem(lr=0.1, seed=4)
    model, start, target, images, labels, syn_lr, batches = prob
    loss, _, _, glr = _grads(prob, "tesla")
    # independent graph-free unroll with torch.func.grad
    from torch.func import functional_call, grad

    from lightning_distill.functional import classification_loss
    from lightning_distill.models import ParamSpec

    spec = ParamSpec.of(model)

    def inner(theta, x, y):
        return classification_loss(functional_call(model, spec.unflatten(theta), (x,)), y)

    theta, gsum = start.clone(), torch.zeros_like(start)
    for idx in batches:
        gi = grad(inner)(theta, images.detach()[idx], labels.detach()[idx])
        gsum += gi
        theta = theta - 0.1 * gi
    d = (start - target).square().sum()
    assert torch.allclose(loss, (theta - target).square().sum() / d, rtol=1e-12, atol=0)
    expected = 2.0 / d * torch.dot(theta - target, -gsum)
    assert torch.allclose(glr, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
def test_backward_inside_larger_graph(mode):
    """Images produced by another op, loss scaled and added: chain rule holds in every mode."""
    prob = _problem(seed=5)
    model, start, target, images, labels, syn_lr, batches = prob
    base = images.detach().clone().requires_grad_(True)

    def outer(m):
        x = base * 1.5
        loss = trajectory_matching_loss(model, start, target, x, labels, syn_lr, batches, mode=m)
        return 2.0 * loss + (x**2).sum() * 1e-3, loss

    total, loss = outer(mode)
    gb, gy, glr = torch.autograd.grad(total, [base, labels, syn_lr])
    # the same via the inner gradients of the plain call
    images2 = (base.detach() * 1.5).requires_grad_(True)
    loss2 = trajectory_matching_loss(
        model, start, target, images2, labels, syn_lr, batches, mode=mode
    )
    ix, iy, ilr = torch.autograd.grad(loss2, [images2, labels, syn_lr])
    assert torch.allclose(gb, 1.5 * (2.0 * ix + 2e-3 * images2.detach()), rtol=1e-12, atol=1e-15)
    assert torch.allclose(gy, 2.0 * iy, rtol=1e-12, atol=1e-15)
    assert torch.allclose(glr, 2.0 * ilr, rtol=1e-12, atol=1e-15)


def test_model_parameters_untouched_and_no_grad_path():
    prob = _problem(seed=6)
    model, start, target, images, labels, syn_lr, batches = prob
    before = [p.detach().clone() for p in model.parameters()]
    loss = trajectory_matching_loss(model, start, target, images, labels, syn_lr, batches)
    loss.backward()
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.grad is None and torch.equal(p, b)
    with torch.no_grad():
        for mode in ("full", "recompute", "tesla"):
            v = trajectory_matching_loss(
                model, start, target, images, labels, syn_lr, batches, mode=mode
            )
            assert not v.requires_grad and torch.equal(v, loss.detach())


def test_float32_recompute_matches_full():
    model, start, target, images, labels, syn_lr, batches = _problem(seed=8)
    model = model.float()
    x = images.detach().float().requires_grad_(True)
    y = labels.detach().float().requires_grad_(True)
    lr = syn_lr.detach().float().requires_grad_(True)  # start/target stay float64: cast inside
    out = {}
    for mode in ("full", "recompute"):
        loss = trajectory_matching_loss(model, start, target, x, y, lr, batches, mode=mode)
        assert loss.dtype == torch.float32
        out[mode] = torch.autograd.grad(loss, [x, y, lr])
    for a, b in zip(out["full"], out["recompute"], strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max())


def test_errors():
    model, start, target, images, labels, syn_lr, batches = _problem()
    call = trajectory_matching_loss
    bn = build_model("ConvNetBN", channels=3, num_classes=K, image_size=8, width=4, depth=2)
    with pytest.raises(ValueError, match="running statistics"):
        call(bn.to(DT), start, target, images, labels, syn_lr, batches)
    with pytest.raises(ValueError, match="start must be a flat parameter vector"):
        call(model, start[:-1], target, images, labels, syn_lr, batches)
    with pytest.raises(ValueError, match="target must be a flat parameter vector"):
        call(model, start, target[None], images, labels, syn_lr, batches)
    with pytest.raises(ValueError, match="labels have 5 rows but images have 6"):
        call(model, start, target, images, labels[:5], syn_lr, batches)
    with pytest.raises(ValueError, match=r"batch indices span \[0, 6\]"):
        call(model, start, target, images, labels, syn_lr, [torch.tensor([0, 6])])
    with pytest.raises(ValueError, match="batches is empty"):
        call(model, start, target, images, labels, syn_lr, [])
    with pytest.raises(ValueError, match="mode="):
        call(model, start, target, images, labels, syn_lr, batches, mode="exact")
    with pytest.raises(ValueError, match="coincide"):
        call(model, start, start, images, labels, syn_lr, batches)
    with pytest.raises(ValueError, match="soft labels must be"):
        call(model, start, target, images, labels[:, 0], syn_lr, batches)
    with pytest.raises(ValueError, match="labels are on meta but images on cpu"):
        call(model, start, target, images, labels.detach().to("meta"), syn_lr, batches)
    with pytest.raises(ValueError, match=r"batches\[1\] must be a non-empty 1-D integer"):
        call(model, start, target, images, labels, syn_lr, [batches[0], torch.tensor([0.5])])


@pytest.mark.parametrize("mode", ["recompute", "tesla"])
def test_partial_requires_grad_and_lr_shapes(mode):
    """Only syn_lr (shape [1], float32) or only the pixels require grad: same as full mode."""
    model, start, target, images, labels, _, batches = _problem(soft=False, seed=9)
    x = images.detach()
    for need_x in (False, True):
        x.requires_grad_(need_x)
        lr = torch.tensor([0.05], dtype=torch.float32, requires_grad=not need_x)
        wrt = [x] if need_x else [lr]
        grads = {}
        for m in ("full", mode):
            loss = trajectory_matching_loss(model, start, target, x, labels, lr, batches, mode=m)
            (grads[m],) = torch.autograd.grad(loss, wrt)
        assert grads[mode].shape == wrt[0].shape and grads[mode].dtype == wrt[0].dtype
        if mode == "recompute":
            assert torch.allclose(grads[mode], grads["full"], rtol=1e-6, atol=0)
        elif need_x:
            assert _cos(grads["full"], grads[mode]) > 0.99
    # a plain float step size (no gradient) is accepted
    loss = trajectory_matching_loss(model, start, target, x, labels, 0.05, batches, mode=mode)
    assert loss.requires_grad
