"""SAM / ASAM / GSAM math against element-by-element float64 hand computations (docs/method.md,
'Flat experts (FTD, GSAM)')."""

import math

import pytest
import torch

from lightning_distill.functional.sharpness import (
    global_norm,
    gsam_gradient,
    inner_product,
    perturbation,
)


def _tensors():
    w = [
        torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64),
        torch.tensor([-0.75, 1.5, 0.0], dtype=torch.float64),
    ]
    g = [
        torch.tensor([[0.1, 0.3], [-0.2, 0.4]], dtype=torch.float64),
        torch.tensor([0.6, -0.05, 0.7], dtype=torch.float64),
    ]
    return w, g


def _flat(ts):
    return [float(v) for t in ts for v in t.reshape(-1).tolist()]


def test_sam_perturbation_element_by_element():
    w, g = _tensors()
    rho = 0.05
    gs = _flat(g)
    norm = math.sqrt(sum(v * v for v in gs))
    expected = [rho * v / (norm + 1e-12) for v in gs]
    e = perturbation(w, g, rho, adaptive=False)
    assert [t.shape for t in e] == [t.shape for t in w]
    assert _flat(e) == pytest.approx(expected, rel=1e-14, abs=0)
    # ||e|| = rho for SAM
    assert math.sqrt(sum(v * v for v in _flat(e))) == pytest.approx(rho, rel=1e-12)


def test_adaptive_perturbation_element_by_element():
    w, g = _tensors()
    rho = 0.5
    ws, gs = _flat(w), _flat(g)
    n = math.sqrt(sum((abs(a) * b) ** 2 for a, b in zip(ws, gs, strict=True)))
    expected = [rho * a * a * b / (n + 1e-12) for a, b in zip(ws, gs, strict=True)]
    e = perturbation(w, g, rho, adaptive=True)
    assert _flat(e) == pytest.approx(expected, rel=1e-14, abs=1e-300)
    # the zero weight gets no perturbation, unlike SAM
    assert e[1][2].item() == 0.0
    assert perturbation(w, g, rho, adaptive=False)[1][2].item() != 0.0


def test_perturbation_zero_gradient_and_zero_rho():
    w, g = _tensors()
    zeros = [torch.zeros_like(t) for t in g]
    for adaptive in (False, True):
        for e in perturbation(w, zeros, 0.1, adaptive) + perturbation(w, g, 0.0, adaptive):
            assert torch.equal(e, torch.zeros_like(e))
    with pytest.raises(ValueError, match="rho"):
        perturbation(w, g, -1.0, False)
    with pytest.raises(ValueError, match="length"):
        perturbation(w[:1], g, 0.1, False)


def test_gsam_gradient_hand_computed():
    _, g = _tensors()
    gp = [
        torch.tensor([[0.3, -0.1], [0.05, 0.2]], dtype=torch.float64),
        torch.tensor([0.4, 0.25, -0.3], dtype=torch.float64),
    ]
    alpha = 0.3
    a, b = _flat(g), _flat(gp)
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    cos = dot / (na * nb + 1e-12)
    g_perp = [x - cos * na * y / (nb + 1e-12) for x, y in zip(a, b, strict=True)]
    expected = [y - alpha * p for y, p in zip(b, g_perp, strict=True)]
    out = gsam_gradient(g, gp, alpha)
    assert _flat(out) == pytest.approx(expected, rel=1e-13, abs=1e-15)
    # g_perp is orthogonal to g' (up to the 1e-12 in the denominators)
    assert sum(p * y for p, y in zip(g_perp, b, strict=True)) == pytest.approx(0.0, abs=1e-11)
    # the helpers agree with the hand values
    assert inner_product(g, gp).item() == pytest.approx(dot, rel=1e-14)
    assert global_norm(g).item() == pytest.approx(na, rel=1e-14)


def test_gsam_gradient_alpha_zero_returns_g_prime():
    _, g = _tensors()
    gp = [t.flip(0) * 3 for t in g]
    out = gsam_gradient(g, gp, 0.0)
    assert len(out) == len(gp)
    assert all(torch.equal(o, t) for o, t in zip(out, gp, strict=True))


def test_gsam_gradient_parallel_gradients_have_no_orthogonal_part():
    _, g = _tensors()
    gp = [2.0 * t for t in g]
    out = gsam_gradient(g, gp, 0.7)
    for o, t in zip(out, gp, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-14)
