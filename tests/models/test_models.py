"""Network zoo: shapes, parameter counts and order, norms, registry (docs/method.md, 'Networks')."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_distill.models import (
    AlexNet,
    ConvNet,
    ParamSpec,
    ResNet18,
    build_model,
    flatten_parameters,
    list_models,
    register_model,
)
from lightning_distill.models import registry as registry_mod

ALL_MODELS = [
    "ConvNet", "ConvNetD4", "ConvNetD5", "ConvNetBN", "AlexNet", "VGG11", "VGG11BN",
    "ResNet18", "ResNet18BN", "ResNet18_AP",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def convnet_count(c: int, size: int, depth: int, width: int = 128, classes: int = 10) -> int:
    """Hand count: conv (w, b) + instancenorm (w, b) per block, then the linear head."""
    total, in_ch = 0, c
    for _ in range(depth):
        total += in_ch * width * 9 + width + 2 * width
        in_ch = width
    side = size // 2**depth
    return total + width * side * side * classes + classes


def test_registry_lists_all_models():
    assert set(ALL_MODELS) <= set(list_models())
    assert list_models() == sorted(list_models())


# ------------------------------------------------------------------ ConvNet


def test_convnet3_cifar10_has_320010_parameters():
    assert n_params(build_model("ConvNet", 3, 10, 32)) == 320_010
    assert n_params(ConvNet(3, 10, 32)) == 320_010
    assert n_params(build_model("ConvNetBN", 3, 10, 32)) == 320_010


@pytest.mark.parametrize(
    ("name", "c", "size", "depth"),
    [("ConvNet", 3, 32, 3), ("ConvNetD4", 3, 64, 4), ("ConvNetD5", 3, 128, 5),
     ("ConvNet", 1, 8, 3)],
)  # fmt: skip
def test_convnet_parameter_count_matches_hand_count(name, c, size, depth):
    m = build_model(name, c, 10, size)
    assert len(m.features) == depth
    assert n_params(m) == convnet_count(c, size, depth)
    assert m.classifier.in_features == 128 * (size // 2**depth) ** 2


def test_convnet_28x28_single_channel_reaches_4x4():
    m = build_model("ConvNet", 1, 10, 28)
    assert m.features[0].conv.padding == (3, 3)
    assert all(b.conv.padding == (1, 1) for b in m.features[1:])
    assert m.classifier.in_features == 128 * 16
    x = torch.randn(2, 1, 28, 28)
    sizes = []
    h = x
    for block in m.features:
        h = block.conv(h)
        sizes.append(tuple(h.shape[-2:]))
        h = block.pool(block.act(block.norm(h)))
    assert sizes == [(32, 32), (16, 16), (8, 8)]
    assert tuple(h.shape) == (2, 128, 4, 4)
    assert m(x).shape == (2, 10)
    # 1 * 128 * 9 + 128 + 256 + 2 * 147840 + 2048 * 10 + 10
    assert n_params(m) == 317_706


def test_convnet_8x8_digits_default_depth():
    m = build_model("ConvNet", 1, 10, 8)
    assert m.features[0].conv.padding == (1, 1)
    assert m.feature_shape == (128, 1, 1)
    assert m.classifier.in_features == 128
    assert m.features(torch.randn(2, 1, 8, 8)).shape == (2, 128, 1, 1)


def test_convnet_rectangular_image_size():
    m = build_model("ConvNet", 3, 5, (32, 16), width=8)
    assert m.feature_shape == (8, 4, 2)
    assert m.classifier.in_features == 64
    assert m(torch.randn(2, 3, 32, 16)).shape == (2, 5)


def test_convnet_parameter_order():
    m = build_model("ConvNet", 3, 10, 32)
    expected = []
    for d in range(3):
        expected += [f"features.{d}.{k}" for k in
                     ("conv.weight", "conv.bias", "norm.weight", "norm.bias")]  # fmt: skip
    expected += ["classifier.weight", "classifier.bias"]
    assert [n for n, _ in m.named_parameters()] == expected
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes[:4] == [(128, 3, 3, 3), (128,), (128,), (128,)]
    assert shapes[-2:] == [(10, 2048), (10,)]


def test_convnet_norm_variants():
    def norm0(**kw):
        return build_model("ConvNet", 3, 10, 32, width=8, **kw).features[0].norm

    inorm = norm0()
    assert isinstance(inorm, nn.GroupNorm) and inorm.num_groups == 8 and inorm.affine
    assert inorm.eps == 1e-5
    gn = norm0(norm="groupnorm")
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    assert isinstance(norm0(norm="batchnorm"), nn.BatchNorm2d)
    ln = norm0(norm="layernorm")
    assert isinstance(ln, nn.LayerNorm) and ln.weight.shape == (8, 32, 32)
    m_ln = build_model("ConvNet", 3, 10, 32, width=8, norm="layernorm")
    assert m_ln.features[2].norm.weight.shape == (8, 8, 8)
    assert m_ln(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m_none = build_model("ConvNet", 3, 10, 32, width=8, norm="none")
    assert [n for n, _ in m_none.named_parameters()][:3] == [
        "features.0.conv.weight", "features.0.conv.bias", "features.1.conv.weight"]  # fmt: skip


def test_convnet_act_and_pooling_variants():
    m = build_model("ConvNet", 1, 3, 8, width=4, act="sigmoid", pooling="maxpooling")
    assert isinstance(m.features[0].act, nn.Sigmoid)
    assert isinstance(m.features[0].pool, nn.MaxPool2d)
    m = build_model("ConvNet", 1, 3, 8, width=4, act="leakyrelu", pooling="none")
    assert isinstance(m.features[0].act, nn.LeakyReLU)
    assert m.features[0].act.negative_slope == 0.01
    assert m.classifier.in_features == 4 * 8 * 8
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_cpu_matmul_pooling_is_the_average_pool():
    """ConvNet's average pool (AvgPool2x2): on small CPU maps one matmul with a fixed
    pooling matrix, avg_pool2d's value (float64, to rounding: a window's four terms may be
    summed in another order) and exactly its gradient (one term per input, x 0.25), also
    through a double backward; other sizes are avg_pool2d itself."""
    import torch.nn.functional as F

    from lightning_distill.models.pooling import CPU_MATMUL_POOL_PIXELS, AvgPool2x2

    assert CPU_MATMUL_POOL_PIXELS == (16, 64)
    net = build_model("ConvNet", 1, 3, 8, width=4, depth=2)
    assert all(type(b.pool) is AvgPool2x2 and isinstance(b.pool, nn.AvgPool2d)
               for b in net.features)
    pool = AvgPool2x2()
    assert (pool.kernel_size, pool.stride, pool.padding) == (2, 2, 0)
    g = torch.Generator().manual_seed(0)
    for hw in [(4, 4), (4, 8), (8, 8), (6, 6), (8, 2)]:
        x = torch.randn(3, 5, *hw, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(3, 5, hw[0] // 2, hw[1] // 2, dtype=torch.float64, generator=g)
        want = F.avg_pool2d(x, 2)
        (grad_want,) = torch.autograd.grad((want.square() * w).sum(), x, create_graph=True)
        got = pool(x)
        (grad_got,) = torch.autograd.grad((got.square() * w).sum(), x, create_graph=True)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(grad_got, grad_want, rtol=1e-15, atol=1e-15)
        (hvp_want,) = torch.autograd.grad(grad_want.sum(), x)
        (hvp_got,) = torch.autograd.grad(grad_got.sum(), x)
        torch.testing.assert_close(hvp_got, hvp_want, rtol=1e-15, atol=1e-15)
        v = torch.randn_like(want)
        (vjp_want,) = torch.autograd.grad(F.avg_pool2d(x, 2), x, v)
        (vjp_got,) = torch.autograd.grad(pool(x), x, v)
        assert torch.equal(vjp_got, vjp_want)  # x 0.25: exact
    for hw in [(10, 10), (2, 2), (5, 5), (7, 4), (16, 16)]:  # outside 16..64 px, or odd
        x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=g)
        assert torch.equal(pool(x), F.avg_pool2d(x, 2)), hw


def test_instancenorm_equals_hand_computed_normalisation():
    m = build_model("ConvNet", 2, 3, 8, width=4, depth=1).double()
    norm = m.features[0].norm
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    h = torch.randn(3, 4, 8, 8, dtype=torch.float64) * 3 + 1
    mean = h.mean(dim=(2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(2, 3), keepdim=True)  # biased, per sample & channel
    ref = (h - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(1, 4, 1, 1) + norm.bias.view(
        1, 4, 1, 1
    )
    torch.testing.assert_close(norm(h), ref, rtol=1e-12, atol=1e-12)
    # per-sample: normalising a single sample gives the same result (no batch statistics)
    torch.testing.assert_close(norm(h[1:2]), ref[1:2], rtol=1e-12, atol=1e-12)
    # train and eval mode agree (no running statistics)
    m.eval()
    torch.testing.assert_close(norm(h), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ other nets


def test_alexnet_structure():
    m = AlexNet(3, 10, 32)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 192, 256, 192, 192]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5), (3, 3), (3, 3), (3, 3)]
    assert convs[0].padding == (2, 2)
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 3
    assert not any(isinstance(l, (nn.GroupNorm, nn.BatchNorm2d)) for l in m.modules())
    assert m.classifier.in_features == 192 * 4 * 4
    m28 = AlexNet(1, 10, 28)
    assert m28.features[0].padding == (4, 4) and m28.classifier.in_features == 192 * 16
    assert AlexNet(1, 10, 8).classifier.in_features == 192


def test_vgg11_structure():
    m = build_model("VGG11", 3, 10, 32)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    norms = [l for l in m.modules() if isinstance(l, nn.GroupNorm)]
    assert len(norms) == 8 and all(g.num_groups == g.num_channels and g.affine for g in norms)
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 5
    assert m.classifier.in_features == 512
    assert n_params(m) == 9_231_114  # the usual CIFAR VGG11 count (same affine params as BN)
    assert build_model("VGG11", 1, 10, 28).features[0].padding == (3, 3)
    small = build_model("VGG11", 1, 10, 8)  # 8 -> 4 -> 2 -> 1, last two pools skipped
    assert sum(isinstance(l, nn.MaxPool2d) for l in small.modules()) == 3
    assert small.feature_shape == (512, 1, 1)
    bn = build_model("VGG11BN", 3, 10, 32)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in bn.modules()) == 8


def test_resnet18_structure():
    m = ResNet18(3, 10, 32)
    assert n_params(m) == 11_173_962  # the usual CIFAR ResNet18 count
    assert m.conv1.stride == (1, 1) and m.conv1.kernel_size == (3, 3)
    assert m.conv1.out_channels == 64
    norms = [l for l in m.modules() if isinstance(l, nn.GroupNorm)]
    assert len(norms) == 20 and all(g.num_groups == g.num_channels for g in norms)
    strided = [l for l in m.modules() if isinstance(l, nn.Conv2d) and l.stride == (2, 2)]
    assert len(strided) == 6  # 3 main-path + 3 shortcut convs
    assert m.classifier.in_features == 512

    bn = build_model("ResNet18BN", 3, 10, 32)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in bn.modules()) == 20
    assert not any(isinstance(l, nn.GroupNorm) for l in bn.modules())

    ap = build_model("ResNet18_AP", 3, 10, 32)
    assert not any(isinstance(l, nn.Conv2d) and l.stride != (1, 1) for l in ap.modules())
    assert sum(isinstance(l, nn.AvgPool2d) for l in ap.modules()) == 6
    assert n_params(ap) == n_params(m)
    # the AvgPool2d follows the stride-1 conv, before the norm
    assert isinstance(ap.layer2[0].conv1[1], nn.AvgPool2d)
    assert isinstance(ap.layer2[0].shortcut[0][1], nn.AvgPool2d)
    assert isinstance(ap.layer2[0].shortcut[1], nn.GroupNorm)


def test_resnet_ap_downsampling_is_average_pool():
    """Stride-1 conv then AvgPool2d(2, 2) == conv output averaged over 2x2 cells."""
    ap = build_model("ResNet18_AP", 3, 10, 8).double()
    conv_pool = ap.layer2[0].conv1
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    full = conv_pool[0](x)
    ref = full.reshape(2, 128, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(conv_pool(x), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ all models

SHAPE_CASES = [(3, 32), (1, 28), (1, 8)]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize(("c", "size"), SHAPE_CASES)
def test_output_shapes(name, c, size):
    if (name, size) in {("ConvNetD4", 8), ("ConvNetD5", 8)}:
        with pytest.raises(ValueError, match="too small"):
            build_model(name, c, 7, size)
        return
    m = build_model(name, c, 7, size)
    out = m(torch.randn(2, c, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_functional_call_matches_forward_exactly(name):
    size = {"ConvNetD4": 16, "ConvNetD5": 32}.get(name, 8)
    m = build_model(name, 1, 4, size)
    x = torch.randn(2, 1, size, size)
    spec = ParamSpec.of(m)
    flat = flatten_parameters(m)
    out_f = functional_call(m, spec.unflatten(flat), (x,))
    assert torch.equal(out_f, m(x))
    # different parameters give different outputs (the dict is really used)
    out_z = functional_call(m, spec.unflatten(torch.zeros_like(flat)), (x,))
    assert torch.equal(out_z, torch.zeros(2, 4))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_float64(name):
    size = {"ConvNetD4": 16, "ConvNetD5": 32}.get(name, 8)
    m = build_model(name, 1, 3, size).double()
    x = torch.randn(2, 1, size, size, dtype=torch.float64)
    assert m(x).dtype == torch.float64
    flat = flatten_parameters(m)
    assert flat.dtype == torch.float64
    assert functional_call(m, ParamSpec.of(m).unflatten(flat), (x,)).dtype == torch.float64


def test_functional_call_gradients_match_finite_differences():
    """d loss / d flat theta through functional_call (what trajectory matching unrolls)."""
    m = build_model("ConvNet", 1, 3, 8, width=2, depth=2).double()
    spec = ParamSpec.of(m)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    flat = flatten_parameters(m).detach().requires_grad_(True)

    def loss(theta, inp):
        return functional_call(m, spec.unflatten(theta), (inp,)).square().sum()

    assert torch.autograd.gradcheck(loss, (flat, x), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ registry


def test_build_model_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model name 'ConvNet9'") as e:
        build_model("ConvNet9", 3, 10, 32)
    for n in ALL_MODELS:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="did you mean 'ConvNet'"):
        build_model("convnet", 3, 10, 32)


def test_build_model_bad_arguments():
    with pytest.raises(ValueError, match=r"does not take keyword\(s\) \['width'\]"):
        build_model("ResNet18", 3, 10, 32, width=64)
    with pytest.raises(ValueError, match="depth"):
        build_model("ConvNetD4", 3, 10, 64, depth=3)
    with pytest.raises(ValueError, match="norm"):
        build_model("ConvNet", 3, 10, 32, norm="weirdnorm")
    with pytest.raises(ValueError, match="act"):
        build_model("ConvNet", 3, 10, 32, act="gelu")
    with pytest.raises(ValueError, match="pooling"):
        build_model("ConvNet", 3, 10, 32, pooling="stride")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("ConvNet", 3, 10, 32, width=6, norm="groupnorm")
    for bad in [(32,), (32, 32, 3), 0, "32", 32.0, (32, -1)]:
        with pytest.raises(ValueError, match="image_size"):
            build_model("ConvNet", 3, 10, bad)
    with pytest.raises(ValueError, match="too small for depth 3"):
        build_model("ConvNet", 3, 10, 4)


def test_build_model_from_config_dict_roundtrip():
    cfg = {"name": "ConvNet", "channels": 1, "num_classes": 5, "image_size": [16, 8],
           "width": 16, "depth": 2, "norm": "layernorm", "act": "leakyrelu"}  # fmt: skip
    m = build_model(**cfg)
    assert m.model_config == cfg
    m2 = build_model(**json.loads(json.dumps(m.model_config)))
    assert ParamSpec.of(m2) == ParamSpec.of(m)
    assert m2.feature_shape == (16, 4, 2)


def test_register_model_custom_entry():
    @register_model(name="_TinyTestNet")
    def _tiny(channels, num_classes, image_size, hidden=3):
        h, w = image_size
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * h * w, hidden),
                             nn.Linear(hidden, num_classes))  # fmt: skip

    try:
        assert "_TinyTestNet" in list_models()
        m = build_model("_TinyTestNet", 2, 4, (3, 5), hidden=6)
        assert m[1].in_features == 30 and m[2].out_features == 4
        with pytest.raises(ValueError, match="already registered"):
            register_model(lambda **kw: None, name="_TinyTestNet")
    finally:
        registry_mod._MODELS.pop("_TinyTestNet")
    assert "_TinyTestNet" not in list_models()
