"""PAD's parameter selection (``param_mask``) and ATT's closest-step matching (``match``)
in trajectory_matching_loss: bit-for-bit defaults, finite differences, a naive unroll."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.data.augment import DSA
from lightning_distill.functional import (
    parameter_mask,
    sample_minibatches,
    trajectory_matching,
    trajectory_matching_loss,
)
from lightning_distill.functional.losses import classification_loss
from lightning_distill.models import ParamSpec, build_model, flatten_parameters

DT = torch.float64
N_IMG, K, BATCH = 6, 3, 4


def _net():
    torch.manual_seed(0)
    return build_model(
        "ConvNet", channels=3, num_classes=K, image_size=8, width=4, depth=2
    ).to(DT)


def _inputs(seed=0, lr=0.05, soft=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N_IMG, 3, 8, 8, generator=g, dtype=DT).requires_grad_(True)
    if soft:
        labels = (2.0 * torch.randn(N_IMG, K, generator=g, dtype=DT)).requires_grad_(True)
    else:
        labels = torch.arange(N_IMG) % K
    syn_lr = torch.tensor(lr, dtype=DT, requires_grad=True)
    return images, labels, syn_lr


def _naive_thetas(model, start, images, labels, lr, batches, dsa=None, aug_seed=7):
    """theta_0..theta_N by a plain loop (no graph), DSA drawn as the unroll draws it."""
    spec = ParamSpec.of(model)
    gen = torch.Generator().manual_seed(aug_seed)
    theta = start.clone()
    out = [theta.clone()]
    for idx in batches:
        x = images.detach()[idx]
        if dsa is not None:
            x = dsa.apply(x, dsa.sample(x, gen))
        th = theta.detach().requires_grad_(True)
        out_ = torch.func.functional_call(model, spec.unflatten(th), (x,))
        (g,) = torch.autograd.grad(classification_loss(out_, labels.detach()[idx]), th)
        theta = theta - float(lr) * g
        out.append(theta.clone())
    return out


def _run(model, start, target, images, labels, syn_lr, batches, mode, *, dsa=None,
         aug_seed=7, **kw):
    gen = torch.Generator().manual_seed(aug_seed)
    for t in (images, labels, syn_lr):
        if t.requires_grad:
            t.grad = None
    res = trajectory_matching(model, start, target, images, labels, syn_lr, batches, dsa,
                              mode, generator=gen, **kw)
    res.loss.backward()
    grads = [None if not t.requires_grad else t.grad.clone() for t in (images, labels, syn_lr)]
    return res, grads


def _fd(f, x, v, h=1e-5):
    with torch.no_grad():
        return float((f(x + h * v) - f(x - h * v)) / (2 * h))


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _target_near_step(model, start, images, labels, lr, batches, step, dsa=None, noise=0.002):
    """A target close to the student's own theta_step, so ATT's k* falls mid-unroll."""
    thetas = _naive_thetas(model, start, images, labels, lr, batches, dsa)
    g = torch.Generator().manual_seed(11)
    return thetas[step] + noise * torch.randn(start.shape, generator=g, dtype=DT)


# ----------------------------------------------------------------- parameter_mask


def test_parameter_mask_depth_ratio_counts_parameters_cifar_convnet():
    """PAD's cut on CIFAR-10 ConvNet-3 (P = 320,010, a = 0.5): conv0, norm0, conv1, norm1
    and the first 8,325 weights of conv2 are dropped."""
    net = build_model("ConvNet", channels=3, num_classes=10, image_size=32)
    spec = ParamSpec.of(net)
    assert spec.total == 320010
    mask = parameter_mask(net, drop_ratio=0.5)
    assert mask.dtype == torch.bool and mask.shape == (320010,)
    first = int(mask.nonzero()[0])
    assert first == math.floor(0.5 * 320010) == 160005
    assert int(mask.sum()) == 320010 - 160005
    assert mask[first:].all() and not mask[:first].any()
    # the dropped part: blocks 0 and 1 whole (conv + norm), then 8,325 entries of conv2
    # parameter order per block: conv.weight, conv.bias, norm.weight, norm.bias
    whole = sum(spec.numels[:8])
    assert spec.numels[8] == 128 * 128 * 9  # conv2.weight, where the cut falls
    assert whole == 3 * 128 * 9 + 128 + 256 + 128 * 128 * 9 + 128 + 256 == 151680
    assert first - whole == 8325
    assert parameter_mask(net, drop_ratio=0.0).all()


def test_parameter_mask_layers_by_name_and_prefix():
    net = _net()
    spec = ParamSpec.of(net)
    mask = parameter_mask(net, layers=["classifier"])
    start = 0
    for name, n in zip(spec.names, spec.numels, strict=True):
        expected = name.startswith("classifier.")
        assert bool(mask[start:start + n].all()) == expected
        assert bool(mask[start:start + n].any()) == expected
        start += n
    one = parameter_mask(net, layers=[spec.names[0]])
    assert int(one.sum()) == spec.numels[0] and one[: spec.numels[0]].all()
    with pytest.raises(ValueError, match="names no parameter"):
        parameter_mask(net, layers=["nonexistent"])
    with pytest.raises(ValueError, match="exactly one"):
        parameter_mask(net)
    with pytest.raises(ValueError, match="exactly one"):
        parameter_mask(net, drop_ratio=0.5, layers=["classifier"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parameter_mask(net, drop_ratio=1.0)


# ------------------------------------------------------------------ masked matching


@pytest.mark.parametrize("mode", ["full", "recompute", "tesla"])
@pytest.mark.parametrize("match", ["last", "closest"])
def test_all_true_mask_is_bit_for_bit_the_default(mode, match):
    model = _net()
    start = flatten_parameters(model).detach().clone()
    g = torch.Generator().manual_seed(0)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=DT)
    images, labels, syn_lr = _inputs()
    batches = sample_minibatches(N_IMG, BATCH, 5, torch.Generator().manual_seed(1))
    dsa = DSA()
    ref, gref = _run(model, start, target, images, labels, syn_lr, batches, mode, dsa=dsa,
                     match=match)
    full_mask = torch.ones(start.numel(), dtype=torch.bool)
    got, ggot = _run(model, start, target, images, labels, syn_lr, batches, mode, dsa=dsa,
                     match=match, param_mask=full_mask)
    assert torch.equal(ref.loss, got.loss)
    assert ref.step == got.step
    for a, b in zip(gref, ggot, strict=True):
        assert torch.equal(a, b)


def test_last_match_default_is_unchanged_api():
    """trajectory_matching_loss without the new keywords == match='last', no mask."""
    model = _net()
    start = flatten_parameters(model).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=DT)
    images, labels, syn_lr = _inputs()
    batches = sample_minibatches(N_IMG, BATCH, 4, torch.Generator().manual_seed(1))
    a = trajectory_matching_loss(model, start, target, images, labels, syn_lr, batches)
    res = trajectory_matching(model, start, target, images, labels, syn_lr, batches,
                              match="last")
    assert torch.equal(a, res.loss) and res.step == 4 and res.distances is None


@pytest.mark.parametrize("how", ["ratio", "layers"])
def test_masked_loss_is_the_masked_ratio(how):
    model = _net()
    start = flatten_parameters(model).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=DT)
    images, labels, syn_lr = _inputs()
    batches = sample_minibatches(N_IMG, BATCH, 5, torch.Generator().manual_seed(1))
    mask = (parameter_mask(model, drop_ratio=0.4) if how == "ratio"
            else parameter_mask(model, layers=["classifier"]))
    thetas = _naive_thetas(model, start, images, labels, 0.05, batches)
    m = mask.to(DT)
    expected = float(((thetas[-1] - target) * m).square().sum()
                     / ((start - target) * m).square().sum())
    with torch.no_grad():
        got = float(trajectory_matching_loss(model, start, target, images, labels, syn_lr,
                                             batches, param_mask=mask))
    assert _rel(got, expected) < 1e-12


@pytest.mark.parametrize("mode", ["full", "recompute"])
@pytest.mark.parametrize("match", ["last", "closest"])
def test_masked_gradients_match_finite_differences(mode, match):
    model = _net()
    start = flatten_parameters(model).detach().clone()
    images, labels, syn_lr = _inputs(seed=2)
    batches = sample_minibatches(N_IMG, BATCH, 6, torch.Generator().manual_seed(3))
    dsa = DSA()
    if match == "closest":
        target = _target_near_step(model, start, images, labels, 0.05, batches, 3, dsa)
    else:
        target = start + 0.05 * torch.randn(start.shape,
                                            generator=torch.Generator().manual_seed(0), dtype=DT)
    mask = parameter_mask(model, drop_ratio=0.3)  # the cut falls inside a tensor
    res, (gx, gy, glr) = _run(model, start, target, images, labels, syn_lr, batches, mode,
                              dsa=dsa, param_mask=mask, match=match)
    if match == "closest":
        assert 1 <= res.step < len(batches)

    def f(x, y, lr):
        gen = torch.Generator().manual_seed(7)
        return trajectory_matching_loss(model, start, target, x, y, lr, batches, dsa, mode,
                                        generator=gen, param_mask=mask, match=match)

    x0, y0, lr0 = images.detach(), labels.detach(), syn_lr.detach()
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        v = torch.randn(x0.shape, generator=g, dtype=DT)
        assert _rel(_fd(lambda x: f(x, y0, lr0), x0, v), float((gx * v).sum())) < 1e-5
        v = torch.randn(y0.shape, generator=g, dtype=DT)
        assert _rel(_fd(lambda y: f(x0, y, lr0), y0, v), float((gy * v).sum())) < 1e-5
    fd = _fd(lambda lr: f(x0, y0, lr), lr0, torch.ones_like(lr0), h=1e-6)
    assert _rel(fd, float(glr)) < 1e-5


# ------------------------------------------------------------------------ ATT


def _att_problem(step=3, steps=6, seed=0, dsa=None):
    model = _net()
    start = flatten_parameters(model).detach().clone()
    images, labels, syn_lr = _inputs(seed=seed)
    batches = sample_minibatches(N_IMG, BATCH, steps, torch.Generator().manual_seed(seed + 1))
    target = _target_near_step(model, start, images, labels, 0.05, batches, step, dsa)
    return model, start, target, images, labels, syn_lr, batches


def _naive_k_star(thetas, target, mask=None):
    """k* = argmin_{k >= 1} sum |theta_k - target| (over the mask), ties to the later k."""
    m = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
    d = [float((t - target)[m].abs().sum()) for t in thetas[1:]]
    best = min(d)
    return max(k for k, v in enumerate(d, start=1) if v == best), d


@pytest.mark.parametrize("use_mask", [False, True])
def test_att_chosen_step_and_gradients_equal_a_naive_unroll_to_that_step(use_mask):
    dsa = DSA()
    model, start, target, images, labels, syn_lr, batches = _att_problem(dsa=dsa)
    mask = parameter_mask(model, drop_ratio=0.25) if use_mask else None
    thetas = _naive_thetas(model, start, images, labels, 0.05, batches, dsa)
    k_star, dists = _naive_k_star(thetas, target, mask)
    assert 1 <= k_star < len(batches)  # the problem is built so that k* is mid-unroll
    # naive: an ordinary ("last") unroll of the first k* steps, same DSA draws
    ref, gref = _run(model, start, target, images, labels, syn_lr, batches[:k_star], "full",
                     dsa=dsa, param_mask=mask)
    for mode in ("full", "recompute"):
        res, grads = _run(model, start, target, images, labels, syn_lr, batches, mode, dsa=dsa,
                          param_mask=mask, match="closest")
        assert res.step == k_star
        assert torch.allclose(res.distances, torch.tensor(dists, dtype=DT), rtol=1e-12)
        assert _rel(float(res.loss.detach()), float(ref.loss.detach())) < 1e-12
        for a, b in zip(grads, gref, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # tesla: its approximation applied to the first k* steps
    tref, tgref = _run(model, start, target, images, labels, syn_lr, batches[:k_star], "tesla",
                       dsa=dsa, param_mask=mask)
    res, grads = _run(model, start, target, images, labels, syn_lr, batches, "tesla", dsa=dsa,
                      param_mask=mask, match="closest")
    assert res.step == k_star
    assert _rel(float(res.loss.detach()), float(tref.loss.detach())) < 1e-12
    for a, b in zip(grads, tgref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_att_ties_go_to_the_later_step_and_never_step_zero():
    model, start, target, images, labels, _, batches = _att_problem()
    zero = torch.tensor(0.0, dtype=DT)  # the student never moves: every D_k ties
    res = trajectory_matching(model, start, target, images.detach(), labels.detach(), zero,
                              batches, match="closest")
    assert res.step == len(batches)
    assert float(res.loss) == 1.0
    # a target behind the start: the student only moves away, yet step 0 is never chosen
    thetas = _naive_thetas(model, start, images, labels, 0.05, batches)
    behind = start - 3.0 * (thetas[1] - start)
    res = trajectory_matching(model, start, behind, images.detach(), labels.detach(), 0.05,
                              batches, match="closest")
    k_star, d = _naive_k_star(thetas, behind)
    assert res.step == k_star >= 1
    assert float((start - behind).abs().sum()) < min(d)  # theta_0 would have been closest


class _CountingDSA(DSA):
    def __init__(self) -> None:
        super().__init__()
        self.applies = 0

    def apply(self, x, params):
        self.applies += 1
        return super().apply(x, params)


def test_att_recompute_reverse_pass_stops_at_k_star():
    dsa = _CountingDSA()
    model, start, target, images, labels, syn_lr, batches = _att_problem(step=2, steps=6, dsa=dsa)
    dsa.applies = 0
    gen = torch.Generator().manual_seed(7)
    res = trajectory_matching(model, start, target, images, labels, syn_lr, batches, dsa,
                              "recompute", generator=gen, match="closest")
    assert dsa.applies == len(batches)  # the forward unroll: every step
    k_star = res.step
    assert 1 <= k_star < len(batches)
    res.loss.backward()
    assert dsa.applies == len(batches) + k_star  # the reverse pass replays steps < k* only


def test_selection_errors():
    model = _net()
    start = flatten_parameters(model).detach().clone()
    target = start + 0.01
    images, labels, syn_lr = _inputs()
    batches = sample_minibatches(N_IMG, BATCH, 2, torch.Generator().manual_seed(1))
    args = (model, start, target, images, labels, syn_lr, batches)
    with pytest.raises(ValueError, match="match="):
        trajectory_matching_loss(*args, match="best")
    with pytest.raises(ValueError, match="boolean tensor"):
        trajectory_matching_loss(*args, param_mask=torch.ones(start.numel()))
    with pytest.raises(ValueError, match="boolean tensor"):
        trajectory_matching_loss(*args, param_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no parameter"):
        trajectory_matching_loss(*args, param_mask=torch.zeros(start.numel(), dtype=torch.bool))
    same = target.clone()
    same[-5:] = start[-5:]
    mask = torch.zeros(start.numel(), dtype=torch.bool)
    mask[-5:] = True
    with pytest.raises(ValueError, match="masked parameters"):
        trajectory_matching_loss(model, start, same, images, labels, syn_lr, batches,
                                 param_mask=mask)
