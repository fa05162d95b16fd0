"""K networks trained as one (functional/batched.py): exactness against K one-at-a-time
networks with the same seeds, per-member augmentation and sharpness, memory refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.data.augment import DSA
from lightning_distill.functional.batched import (
    GroupMemoryError,
    StackedNetworks,
    augment_members,
    check_group_memory,
    estimate_group_memory,
    member_losses,
)
from lightning_distill.functional.evaluation import seeded_model
from lightning_distill.functional.sharpness import gsam_gradient, perturbation
from lightning_distill.models import build_model
from lightning_distill.models.params import flatten_parameters

SEEDS = [3, 5, 8]


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _nets(**kw):
    kw = {"width": 4, "depth": 2, **kw}
    return [seeded_model("ConvNet", 1, 3, 8, seed=s, **kw) for s in SEEDS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-member relative difference ||a_k - b_k|| / ||a_k||."""
    return float(((a - b).norm(dim=1) / a.norm(dim=1)).max())


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"])
@pytest.mark.parametrize("backend", ["grouped", "vmap", "loop"])
def test_group_forward_is_each_members_forward(float64, norm, backend):
    nets = _nets(norm=norm, width=8)
    group = StackedNetworks(nets, backend=backend)
    x = torch.randn(3, 5, 1, 8, 8)
    ref = torch.stack([n(x[k]) for k, n in enumerate(nets)])
    assert torch.allclose(group(x), ref, rtol=0, atol=1e-12)
    shared = torch.stack([n(x[0]) for n in nets])
    assert torch.allclose(group.forward_shared(x[0]), shared, rtol=0, atol=1e-12)
    assert torch.equal(group.flat_members(), torch.stack([flatten_parameters(n) for n in nets]))
    if norm == "batchnorm":  # running statistics, per member
        for k, n in enumerate(nets):
            m = group.member(k)
            assert torch.allclose(m.features[0].norm.running_mean,
                                  n.features[0].norm.running_mean, atol=1e-12)


def test_auto_backend_chooses_by_device_image_and_step_size():
    """"auto": grouped convolutions for the ConvNet family on an accelerator and on a CPU
    for small images (at most CPU_GROUPED_MAX_IMAGE = H x W) in steps of at most
    CPU_GROUPED_MAX_PIXELS (images x H x W), the loop for the rest on a CPU; other
    networks vmap on an accelerator, the loop on a CPU."""
    from lightning_distill.functional.batched import (
        CPU_GROUPED_MAX_IMAGE,
        CPU_GROUPED_MAX_PIXELS,
        auto_backend,
    )

    group = StackedNetworks(_nets())
    assert group.backend == "auto" and group.grouped_ok
    assert (CPU_GROUPED_MAX_IMAGE, CPU_GROUPED_MAX_PIXELS) == (64, 16384)
    assert group.backend_for(torch.zeros(256, 1, 8, 8)) == "grouped"  # 16384: at the bound
    assert group.backend_for(torch.zeros(257, 1, 8, 8)) == "loop"
    assert group.backend_for(torch.zeros(1, 1, 9, 8)) == "loop"  # 72-pixel images
    assert auto_backend(True, "cpu", 4, 28 * 28) == "loop"
    assert auto_backend(True, "cuda", 10**6, 28 * 28) == "grouped"
    assert auto_backend(False, "cuda", 10, 64) == "vmap"
    assert auto_backend(False, "cpu", 10, 64) == "loop"
    assert StackedNetworks(_nets(), backend="vmap").backend_for(torch.zeros(1, 1, 8, 8)) == "vmap"
    x = torch.randn(3, 300, 1, 8, 8)  # a loop step and a grouped step compute the same
    assert torch.allclose(group(x), StackedNetworks(_nets(), backend="grouped")(x), atol=1e-5)
    alex = [build_model("AlexNet", 1, 3, 32) for _ in range(2)]
    group = StackedNetworks(alex)
    assert not group.grouped_ok and group.backend_for(torch.zeros(2, 1, 32, 32)) == "loop"
    x = torch.randn(2, 2, 1, 32, 32)
    assert torch.allclose(group(x), torch.stack([n(x[k]) for k, n in enumerate(alex)]),
                          atol=1e-5)
    assert torch.allclose(StackedNetworks(alex, backend="vmap")(x), group(x), atol=1e-5)
    with pytest.raises(ValueError, match="ConvNet family"):
        StackedNetworks(alex, backend="grouped")
    with pytest.raises(ValueError, match="differs in architecture"):
        StackedNetworks([_nets()[0], seeded_model("ConvNet", 1, 3, 8, seed=0, width=5, depth=2)])


def _gsam_step(params, loss_fn, opt, rho, alpha, adaptive, per_member):
    """One SAM / ASAM / GSAM step the way callbacks/sharpness.py does it."""
    opt.zero_grad()
    loss_fn().backward()
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        originals = [p.detach().clone() for p in params]
        for p, e in zip(params, perturbation(originals, grads, rho, adaptive,
                                             per_member=per_member), strict=True):
            p.add_(e)
    g_prime = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, w in zip(params, originals, strict=True):
            p.copy_(w)
        for p, f in zip(params, gsam_gradient(grads, g_prime, alpha, per_member=per_member),
                        strict=True):
            p.grad.copy_(f)
    opt.step()


SHARP = {"sam": (0.05, 0.0, False), "asam": (0.5, 0.0, True), "gsam": (0.05, 0.3, True)}


def _side_by_side(nets, backend: str, method: str, steps: int):
    """Train ``nets`` one at a time and, from the same initialisation, as one group for
    ``steps`` optimizer steps (momentum, weight decay, DSA per member, own batch
    order); returns (initial, one-at-a-time, group) flat parameters ``[K, P]``."""
    k_members = len(nets)
    group = StackedNetworks(nets, backend=backend)
    init = group.flat_members().detach().clone()
    g = torch.Generator().manual_seed(0)
    data_x, data_y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    dsa = DSA(flip=False)
    orders = [torch.Generator().manual_seed(100 + k) for k in range(k_members)]
    dsa_single = [torch.Generator().manual_seed(200 + k) for k in range(k_members)]
    dsa_group = [torch.Generator().manual_seed(200 + k) for k in range(k_members)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = [torch.optim.SGD(n.parameters(), **kw) for n in nets]
    gopt = torch.optim.SGD(group.parameters(), **kw)
    for _ in range(steps):
        idx = torch.stack([torch.randperm(24, generator=o)[:8] for o in orders])
        xs = [dsa(data_x[idx[k]], generator=dsa_single[k]) for k in range(k_members)]
        xg = augment_members(dsa, data_x[idx], dsa_group)
        ys, yg = [data_y[idx[k]] for k in range(k_members)], data_y[idx]
        for k, net in enumerate(nets):
            def loss_k(net=net, x=xs[k], y=ys[k]):
                return F.cross_entropy(net(x), y)
            if method == "sgd":
                opts[k].zero_grad()
                loss_k().backward()
                opts[k].step()
            else:
                _gsam_step(list(net.parameters()), loss_k, opts[k], *SHARP[method], False)

        def loss_group(x=xg, y=yg):
            return member_losses(group(x), y).sum()
        if method == "sgd":
            gopt.zero_grad()
            loss_group().backward()
            gopt.step()
        else:
            _gsam_step(list(group.parameters()), loss_group, gopt, *SHARP[method], True)
    single = torch.stack([flatten_parameters(n) for n in nets]).detach()
    return init, single, group.flat_members().detach()


@pytest.mark.parametrize("method", ["sgd", "sam", "asam", "gsam"])
@pytest.mark.parametrize("backend", ["grouped", "vmap", "loop"])
def test_float64_twenty_steps_of_a_group_equal_the_single_networks(float64, method, backend):
    """K members after 20 optimizer steps (momentum, weight decay, DSA per member, own
    batch order) equal the K one-at-a-time networks to 1e-10 relative (measured ~1e-15)."""
    init, single, grouped = _side_by_side(_nets(), backend, method, 20)
    assert _rel(single, grouped) < 1e-10
    assert _rel(init, single) > 0.1  # the networks did move


def test_loop_backend_is_bit_identical_to_the_single_networks_in_float32():
    """The loop backend runs each member's own operations on views of the stacked
    parameters: after 10 SGD steps with per-member DSA and batch order, every member is
    bit for bit the one-at-a-time network (float32, no tolerance)."""
    init, single, grouped = _side_by_side(_nets(width=8), "loop", "sgd", 10)
    assert torch.equal(single, grouped) and not torch.equal(init, single)
    # the grouped kernels, by contrast, round differently
    _, single, grouped = _side_by_side(_nets(width=8), "grouped", "sgd", 10)
    assert not torch.equal(single, grouped) and _rel(single, grouped) < 1e-5


def test_augment_members_draws_each_members_own_stream():
    dsa = DSA(flip=True)
    x = torch.randn(4, 6, 3, 8, 8)
    gens = [torch.Generator().manual_seed(k) for k in range(4)]
    out = augment_members(dsa, x, gens)
    ref = torch.stack([dsa(x[k], generator=torch.Generator().manual_seed(k)) for k in range(4)])
    assert torch.allclose(out, ref, atol=1e-6)
    # a plain callable is called once per member
    calls = []
    out = augment_members(lambda xb, generator: calls.append(generator) or xb + 1, x, gens)
    assert calls == gens and torch.equal(out, x + 1)


def test_member_losses_are_each_members_classification_loss():
    logits = torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (3, 5))
    soft = torch.randn(3, 5, 4)
    from lightning_distill.functional.losses import classification_loss

    for k in range(3):
        assert torch.allclose(member_losses(logits, y)[k], classification_loss(logits[k], y[k]))
        assert torch.allclose(member_losses(logits, soft)[k],
                              classification_loss(logits[k], soft[k]))


def test_a_group_that_does_not_fit_is_refused_with_the_estimate_and_a_smaller_k():
    net = build_model("ConvNet", 3, 10, 32)  # ConvNet-3, 320k parameters
    est = estimate_group_memory(net, (3, 32, 32), 256, 8)
    assert est["total"] == 8 * est["per_member"] > 0
    assert est["activations"] > est["parameters"]
    budget = 3 * est["per_member"] + 1
    with pytest.raises(GroupMemoryError, match=r"8 networks at batch 256 need about .* MiB"
                       r".*use group_size 3 \(or less\)"):
        check_group_memory(net, (3, 32, 32), 256, 8, "cpu", budget=budget)
    assert check_group_memory(net, (3, 32, 32), 256, 3, "cpu", budget=budget) == \
        estimate_group_memory(net, (3, 32, 32), 256, 3)
    with pytest.raises(GroupMemoryError, match="even one network does not fit"):
        check_group_memory(net, (3, 32, 32), 256, 2, "cpu", budget=10)
