"""Tests for lightning_distill.data.augment (DSA: docs/method.md, section 'Differentiable siamese
augmentation')."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.data.augment import (
    DEFAULT_DSA_STRATEGY,
    DSA,
    FAMILIES,
    DSAParams,
    ResumableGenerator,
    dsa_flip_for,
)

DEFAULT_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _images(n=3, c=3, h=8, w=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- construction
def test_default_families_and_identity():
    assert DSA().families == DEFAULT_FAMILIES
    assert DSA().strategy == DEFAULT_DSA_STRATEGY == "_".join(DEFAULT_FAMILIES)
    x = _images()
    for s in ("", "none", "None"):
        dsa = DSA(s)
        assert dsa.is_identity
        p = dsa.sample(x, _gen(0))
        assert p.family == "none" and p.tensors == {}
        assert dsa(x, _gen(0)) is x


def test_unknown_family_raises_naming_it():
    with pytest.raises(ValueError, match="'blur'"):
        DSA("color_blur_crop")


def test_flip_dropped():
    assert "flip" not in DSA(flip=False).families
    assert DSA(flip=False).families == ("color", "crop", "cutout", "scale", "rotate")
    assert DSA("flip", flip=False).is_identity
    assert not DSA.for_dataset("mnist").flip
    assert not DSA.for_dataset("MNIST").flip
    assert not DSA.for_dataset("digits").flip
    assert DSA.for_dataset("fashion_mnist").flip
    assert DSA.for_dataset("FashionMNIST").flip
    assert DSA.for_dataset("cifar10").flip
    assert DSA.for_dataset("mnist", flip=True).flip  # an explicit flip wins
    for name in ("mnist", "EMNIST", "digits", "svhn", "usps"):
        assert dsa_flip_for(name) is False, name
    for name in ("fashion_mnist", "Fashion-MNIST", "cifar10", "tiny_imagenet", ""):
        assert dsa_flip_for(name) is True, name
    x = _images(2, 1, 8, 8)
    dsa = DSA(flip=False)
    fams = {dsa.sample(x, _gen(s)).family for s in range(200)}
    assert fams == {"color", "crop", "cutout", "scale", "rotate"}


def test_one_family_per_call_and_call_equals_sample_then_apply():
    dsa = DSA()
    x = _images(4)
    fams = [dsa.sample(x, _gen(s)).family for s in range(300)]
    assert set(fams) == set(DEFAULT_FAMILIES)
    counts = [fams.count(f) for f in DEFAULT_FAMILIES]
    assert min(counts) >= 25  # uniform: expected 50 each
    for s in range(20):
        p = dsa.sample(x, _gen(s))
        expected = dsa.apply(x, p)
        assert torch.equal(dsa(x, _gen(s)), expected)
        # the whole batch gets that single family: every sample matches applying only it
        for i in range(4):
            single = DSAParams(p.family, {k: v[i : i + 1] for k, v in p.tensors.items()})
            torch.testing.assert_close(
                dsa.apply(x[i : i + 1], single)[0], expected[i], rtol=0, atol=1e-6
            )


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_pixels(family):
    dsa = DSA()
    x = _images(3, 3, 8, 8).requires_grad_(True)
    p = dsa.sample(x, _gen(1), family=family)
    y = dsa.apply(x, p)
    w = torch.randn(y.shape, generator=_gen(2))
    (y * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_differences_float64(family):
    """Autograd directional derivative == central difference of a nonlinear loss (float64)."""
    dsa = DSA()
    x = _images(2, 3, 6, 6, seed=3, dtype=torch.float64)
    p = dsa.sample(x, _gen(4), family=family)
    w = torch.randn(x.shape, generator=_gen(5), dtype=torch.float64)

    def loss(inp):
        return (torch.sin(3.0 * dsa.apply(inp, p)) * w).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xr), xr)
    eps = 1e-6
    for k in range(3):
        v = torch.randn(x.shape, generator=_gen(10 + k), dtype=torch.float64)
        fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
        ad = (grad * v).sum()
        assert abs(fd.item() - ad.item()) <= 1e-6 * max(1.0, abs(ad.item())), (family, fd, ad)


# ---------------------------------------------------------------- parameter ranges
def test_sampled_parameter_ranges():
    dsa = DSA()
    x = torch.zeros(4000, 1, 32, 16)
    g = _gen(7)

    def check(t, lo, hi, tol):
        assert t.min() >= lo and t.max() <= hi
        assert t.min() < lo + tol and t.max() > hi - tol

    p = dsa.sample(x, g, family="scale")
    for key in ("sx", "sy"):
        check(p.tensors[key], 1 / 1.2, 1.2, 0.01)
    assert not torch.equal(p.tensors["sx"], p.tensors["sy"])  # independent
    check(dsa.sample(x, g, family="rotate").tensors["degrees"], -15.0, 15.0, 0.1)
    mask = dsa.sample(x, g, family="flip").tensors["mask"]
    assert mask.dtype == torch.bool and 0.45 < mask.float().mean() < 0.55
    c = dsa.sample(x, g, family="color").tensors
    check(c["brightness"], -0.5, 0.5, 0.01)
    check(c["saturation"], 0.0, 2.0, 0.01)
    check(c["contrast"], 0.5, 1.5, 0.01)
    shift = dsa.sample(x, g, family="crop").tensors["shift"]
    # H = 32 -> round(0.125 * 32) = 4 rows; W = 16 -> 2 columns, every integer hit
    assert set(shift[:, 0].tolist()) == set(range(-4, 5))
    assert set(shift[:, 1].tolist()) == set(range(-2, 3))
    centre = dsa.sample(x, g, family="cutout").tensors["center"]
    # even sizes 16 x 8: centres over [0, H] x [0, W]
    assert set(centre[:, 0].tolist()) == set(range(0, 33))
    assert set(centre[:, 1].tolist()) == set(range(0, 17))
    # odd size (0.5 * 10 = 5): centres over [0, H - 1]
    centre = dsa.sample(torch.zeros(2000, 1, 10, 10), g, family="cutout").tensors["center"]
    assert set(centre.flatten().tolist()) == set(range(0, 10))


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_is_bit_identical_and_params_untouched(family):
    dsa = DSA()
    x = _images(4, 3, 8, 8, seed=11)
    p = dsa.sample(x, _gen(12), family=family)
    before = {k: v.clone() for k, v in p.tensors.items()}
    y1 = dsa.apply(x, p)
    y2 = dsa.apply(x.clone(), p)
    assert torch.equal(y1, y2)
    assert torch.equal(dsa.apply(x, p.to("cpu")), y1)
    for k, v in p.tensors.items():
        assert torch.equal(v, before[k])


def test_same_seed_same_output():
    dsa = DSA()
    x = _images(4, 3, 8, 8)
    outs = [dsa(x, _gen(s)) for s in range(10)]
    for s in range(10):
        assert torch.equal(dsa(x, _gen(s)), outs[s])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(123)
    a = dsa(x)
    torch.manual_seed(123)
    assert torch.equal(dsa(x), a)


def test_batch_size_mismatch_raises():
    dsa = DSA()
    p = dsa.sample(_images(4), _gen(0), family="rotate")
    with pytest.raises(ValueError, match="batch of 4"):
        dsa.apply(_images(3), p)


@pytest.mark.parametrize("family", FAMILIES)
def test_dtype_kept(family):
    dsa = DSA()
    for dtype in (torch.float32, torch.float64):
        x = _images(2, 3, 8, 8, dtype=dtype)
        y = dsa.apply(x, dsa.sample(x, _gen(0), family=family))
        assert y.dtype == dtype and y.shape == x.shape


# ---------------------------------------------------------------- hand formulas
def test_color_formulas():
    dsa = DSA()
    x = _images(3, 3, 5, 5, seed=21, dtype=torch.float64)
    b = torch.tensor([-0.3, 0.1, 0.45])
    s = torch.tensor([0.2, 1.0, 1.9])
    c = torch.tensor([0.6, 1.0, 1.4])
    yb = dsa.apply(x, DSAParams("brightness", {"brightness": b}))
    ys = dsa.apply(x, DSAParams("saturation", {"saturation": s}))
    yc = dsa.apply(x, DSAParams("contrast", {"contrast": c}))
    ycol = dsa.apply(x, DSAParams("color", {"brightness": b, "saturation": s, "contrast": c}))
    for i in range(3):
        bi, si, ci = float(b[i]), float(s[i]), float(c[i])
        xi = x[i]
        eb = xi + bi
        m = xi.mean(dim=0, keepdim=True)
        es = (xi - m) * si + m
        ec = (xi - xi.mean()) * ci + xi.mean()
        torch.testing.assert_close(yb[i], eb, rtol=0, atol=1e-7)
        torch.testing.assert_close(ys[i], es, rtol=0, atol=1e-7)
        torch.testing.assert_close(yc[i], ec, rtol=0, atol=1e-7)
        # color = brightness, then saturation, then contrast
        z = eb
        z = (z - z.mean(dim=0, keepdim=True)) * si + z.mean(dim=0, keepdim=True)
        z = (z - z.mean()) * ci + z.mean()
        torch.testing.assert_close(ycol[i], z, rtol=0, atol=1e-7)
    # saturation on a single channel is the identity (mean over channels = the pixel)
    g = _images(2, 1, 4, 4)
    gs = dsa.apply(g, DSAParams("saturation", {"saturation": torch.tensor([0.3, 1.7])}))
    torch.testing.assert_close(gs, g, rtol=0, atol=1e-6)


def test_flip_flips_exactly_chosen_samples():
    dsa = DSA()
    x = _images(4)
    y = dsa.apply(x, DSAParams("flip", {"mask": torch.tensor([True, False, True, False])}))
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[2], x[2].flip(-1))
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])


def test_crop_is_integer_shift_with_zero_fill():
    dsa = DSA()
    n, c, h, w = 5, 2, 7, 9
    x = _images(n, c, h, w, seed=31) + 1.0  # no zeros in the input
    shift = torch.tensor([[0, 0], [3, -2], [-1, 4], [-7, 0], [2, 9]])
    y = dsa.apply(x, DSAParams("crop", {"shift": shift}))
    expected = torch.zeros_like(x)
    for i in range(n):
        dy, dx = shift[i].tolist()
        for r in range(h):
            for col in range(w):
                if 0 <= r + dy < h and 0 <= col + dx < w:
                    expected[i, :, r, col] = x[i, :, r + dy, col + dx]
    assert torch.equal(y, expected)
    # sampled crops are the same kind of shift
    p = dsa.sample(torch.zeros(64, 1, 16, 16), _gen(3), family="crop")
    assert p.tensors["shift"].dtype == torch.int64
    assert p.tensors["shift"].abs().max() <= 2


def test_cutout_zeroes_exact_square():
    dsa = DSA()
    n, h, w = 4, 12, 12  # size round(0.5 * 12) = 6
    x = _images(n, 3, h, w, seed=41) + 1.0
    centre = torch.tensor([[6, 6], [0, 0], [12, 5], [3, 11]])
    y = dsa.apply(x, DSAParams("cutout", {"center": centre}))
    for i in range(n):
        cy, cx = centre[i].tolist()
        mask = torch.ones(h, w)
        for r in range(cy - 3, cy + 3):
            for col in range(cx - 3, cx + 3):
                if 0 <= r < h and 0 <= col < w:
                    mask[r, col] = 0.0
        assert torch.equal(y[i], x[i] * mask)
    # a centred hole is exactly 6 x 6 in every channel
    assert int((y[0] == 0).sum()) == 3 * 36
    assert int((y[1] == 0).sum()) == 3 * 9  # corner: a 3 x 3 quarter inside


# ---------------------------------------------------------------- geometry
def test_scale_and_rotate_hand_cases():
    dsa = DSA()
    row = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5).contiguous()
    # sx = 0.5: output column j samples input at x = 2 + 0.5 * (j - 2) (align_corners=True)
    y = dsa.apply(row, DSAParams("scale", {"sx": torch.tensor([0.5]), "sy": torch.tensor([1.0])}))
    torch.testing.assert_close(y[0, 0, 2], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    ident = DSAParams("scale", {"sx": torch.ones(1), "sy": torch.ones(1)})
    img = _images(1, 2, 6, 6)
    torch.testing.assert_close(dsa.apply(img, ident), img, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        dsa.apply(img, DSAParams("rotate", {"degrees": torch.zeros(1)})), img, rtol=0, atol=1e-6
    )
    # +90 degrees on a square image is torch.rot90 with k=1 over (H, W)
    y = dsa.apply(img, DSAParams("rotate", {"degrees": torch.tensor([90.0])}))
    torch.testing.assert_close(y, torch.rot90(img, 1, (2, 3)), rtol=0, atol=1e-5)
    # rotation angle is used in degrees: 45 degrees keeps the centre pixel of an odd image
    odd = _images(1, 1, 5, 5)
    y = dsa.apply(odd, DSAParams("rotate", {"degrees": torch.tensor([45.0])}))
    torch.testing.assert_close(y[0, 0, 2, 2], odd[0, 0, 2, 2])
    assert not math.isclose(float(y[0, 0, 0, 2]), float(odd[0, 0, 0, 2]))


# ---------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_input_matches_cpu():
    dsa = DSA()
    x = _images(4)
    for s in range(12):
        p_cpu = dsa.sample(x, _gen(s))
        p_gpu = dsa.sample(x.cuda(), _gen(s))
        assert p_gpu.family == p_cpu.family
        for k, v in p_gpu.tensors.items():
            assert v.device.type == "cuda"
            assert torch.equal(v.cpu(), p_cpu.tensors[k])
        y = dsa.apply(x.cuda(), p_gpu)
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), dsa.apply(x, p_cpu), rtol=0, atol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    y = dsa(x.cuda(), g)
    assert y.device.type == "cuda"


def test_resumable_generator_seeds_saves_and_restores():
    a = ResumableGenerator(7)
    assert a.generator.device.type == "cpu"
    assert torch.equal(torch.rand(4, generator=a.generator),
                       torch.rand(4, generator=torch.Generator().manual_seed(7)))
    state = a.state()
    nxt = torch.rand(4, generator=a.generator)
    b = ResumableGenerator(123)
    b.restore(state)  # continues a's stream, not its own seed's
    assert torch.equal(torch.rand(4, generator=b.generator), nxt)
    b.restore(None)  # back to its own seed
    assert torch.equal(torch.rand(4, generator=b.generator),
                       torch.rand(4, generator=torch.Generator().manual_seed(123)))
