"""Tests of the soft / hard cross-entropy (DATM soft labels, docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.functional import classification_loss, soft_cross_entropy


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    # row 0: q = (1/2, 1/2), log p = (log 1/2, log 1/2) -> log 2
    # row 1: q = (1/2, 1/2), p = (3/4, 1/4) -> -(log 3/4 + log 1/4) / 2
    expected = (math.log(2.0) - 0.5 * (math.log(0.75) + math.log(0.25))) / 2
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-14)


def test_soft_cross_entropy_matches_torch_probability_targets_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours = soft_cross_entropy(logits, target)
    ref = F.cross_entropy(logits, F.softmax(target, dim=1))
    assert torch.allclose(ours, ref, rtol=1e-14, atol=0)
    ga = torch.autograd.grad(ours, [logits, target])
    gb = torch.autograd.grad(ref, [logits, target])
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    # d/dlogits = (softmax(logits) - softmax(target)) / B
    expected = (F.softmax(logits, 1) - F.softmax(target, 1)).detach() / 5
    assert torch.allclose(ga[0], expected, rtol=1e-12, atol=1e-15)


def test_classification_loss_dispatch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    hard = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(classification_loss(logits, hard), F.cross_entropy(logits, hard))
    # hard labels equal soft labels with (near) one-hot logits
    onehot = F.one_hot(hard, 3).double() * 1e3
    assert classification_loss(logits, onehot).item() == pytest.approx(
        F.cross_entropy(logits, hard).item(), rel=1e-12
    )
    soft = torch.randn(6, 3, generator=g, dtype=torch.float64)
    assert torch.equal(classification_loss(logits, soft), soft_cross_entropy(logits, soft))


def test_loss_errors():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(logits, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="hard labels must be"):
        classification_loss(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="floating labels must be"):
        classification_loss(logits, torch.zeros(4))
