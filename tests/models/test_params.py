"""Flat parameter vectors (lightning_distill/models/params.py, docs/method.md 'Networks' order)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_distill.models import (
    ParamSpec,
    build_model,
    flatten_parameters,
    has_running_stats,
    load_flat_parameters,
    unflatten_parameters,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_convnet(**kw) -> nn.Module:
    return build_model("ConvNet", 1, 3, 8, width=4, depth=2, **kw)


def test_paramspec_of_convnet():
    spec = ParamSpec.of(tiny_convnet())
    assert spec.names == (
        "features.0.conv.weight", "features.0.conv.bias",
        "features.0.norm.weight", "features.0.norm.bias",
        "features.1.conv.weight", "features.1.conv.bias",
        "features.1.norm.weight", "features.1.norm.bias",
        "classifier.weight", "classifier.bias",
    )  # fmt: skip
    assert spec.shapes == ((4, 1, 3, 3), (4,), (4,), (4,), (4, 4, 3, 3), (4,), (4,), (4,),
                           (3, 16), (3,))  # fmt: skip
    assert spec.numels == (36, 4, 4, 4, 144, 4, 4, 4, 48, 3)
    assert spec.total == 255
    assert ParamSpec.of(build_model("ConvNet", 3, 10, 32)).total == 320_010


def test_paramspec_json_roundtrip():
    spec = ParamSpec.of(tiny_convnet())
    again = ParamSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec
    assert isinstance(again.shapes[0], tuple)


def test_flatten_is_concatenation_in_named_parameters_order():
    m = tiny_convnet()
    flat = flatten_parameters(m)
    expected = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    assert flat.shape == (255,)
    assert torch.equal(flat, expected)
    assert flat[0] == m.features[0].conv.weight[0, 0, 0, 0]
    assert torch.equal(flat[-3:], m.classifier.bias.detach())
    # iterable form
    assert torch.equal(flatten_parameters(list(m.parameters())), flat)
    assert flatten_parameters(nn.ReLU()).shape == (0,)


def test_flatten_gradient_flows_to_parameters():
    m = tiny_convnet()
    w = torch.arange(255, dtype=torch.float32)
    (flatten_parameters(m) * w).sum().backward()
    torch.testing.assert_close(m.classifier.bias.grad, torch.tensor([252.0, 253.0, 254.0]))
    assert torch.equal(m.features[0].conv.weight.grad.reshape(-1), w[:36])


def test_unflatten_views_and_roundtrip():
    m = tiny_convnet()
    flat = torch.randn(255)
    d = unflatten_parameters(flat, m)
    assert list(d) == list(ParamSpec.of(m).names)
    assert d["features.1.conv.weight"].shape == (4, 4, 3, 3)
    assert torch.equal(flatten_parameters(d.values()), flat)  # unflatten -> flatten round trip
    # views share memory with the flat vector
    flat[36] = 123.0
    assert d["features.0.conv.bias"][0] == 123.0
    # flatten -> unflatten round trip on the module's own parameters
    back = ParamSpec.of(m).unflatten(flatten_parameters(m))
    for n, p in m.named_parameters():
        assert torch.equal(back[n], p)


def test_unflatten_gradient_flows_to_flat():
    m = tiny_convnet()
    flat = torch.zeros(255, requires_grad=True)
    d = ParamSpec.of(m).unflatten(flat)
    (d["classifier.bias"] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    expected = torch.zeros(255)
    expected[-3:] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(flat.grad, expected)


def test_unflatten_wrong_size_raises():
    spec = ParamSpec.of(tiny_convnet())
    with pytest.raises(ValueError, match=r"expected \[255\]"):
        spec.unflatten(torch.zeros(254))
    with pytest.raises(ValueError, match=r"expected \[255\]"):
        spec.unflatten(torch.zeros(1, 255))


def test_functional_call_with_unflattened_flat_equals_forward():
    m = build_model("ConvNet", 3, 10, 32)
    x = torch.randn(2, 3, 32, 32)
    params = ParamSpec.of(m).unflatten(flatten_parameters(m))
    assert torch.equal(functional_call(m, params, (x,)), m(x))


def test_load_flat_parameters_copies():
    m = tiny_convnet()
    src = tiny_convnet()  # different random init
    flat = flatten_parameters(src).detach().clone()
    assert not torch.equal(flatten_parameters(m), flat)
    out = load_flat_parameters(m, flat)
    assert out is m
    assert torch.equal(flatten_parameters(m), flat)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m(x), src(x))
    # a copy, not an alias: changing the vector afterwards leaves the module alone
    before = flat.clone()
    flat.add_(1.0)
    assert torch.equal(flatten_parameters(m), before)
    # dtype conversion on copy (float64 vector into float32 module)
    load_flat_parameters(m, flat.double())
    assert m.classifier.weight.dtype == torch.float32
    assert torch.equal(flatten_parameters(m), flat)
    with pytest.raises(ValueError, match="expected"):
        load_flat_parameters(m, flat[:-1])


def test_has_running_stats():
    assert has_running_stats(build_model("ConvNetBN", 3, 10, 8))
    assert has_running_stats(build_model("ResNet18BN", 3, 10, 8))
    assert has_running_stats(build_model("ConvNet", 1, 3, 8, width=4, norm="batchnorm"))
    assert not has_running_stats(build_model("ConvNet", 3, 10, 8))
    assert not has_running_stats(build_model("ResNet18", 3, 10, 8))
    assert not has_running_stats(build_model("AlexNet", 3, 10, 8))
    assert not has_running_stats(tiny_convnet(norm="layernorm"))
    assert not has_running_stats(nn.BatchNorm2d(4, track_running_stats=False))
