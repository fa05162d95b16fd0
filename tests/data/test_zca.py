"""Tests for lightning_distill.data.zca (ZCA whitening, docs/method.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_distill.data.zca import ZCA

SHAPE = (3, 4, 4)


def _data(n=500, seed=0, dtype=torch.float32):
    """Correlated images in [0, 1]: a shared per-image level plus a mixed random field."""
    g = torch.Generator().manual_seed(seed)
    d = 48
    mix = torch.rand(d, d, generator=g, dtype=torch.float64) / d
    z = torch.rand(n, d, generator=g, dtype=torch.float64) @ mix
    level = torch.rand(n, 1, generator=g, dtype=torch.float64)
    x = 0.5 * level + 0.3 * z / z.max() + 0.2 * torch.rand(n, d, generator=g, dtype=torch.float64)
    return x.clamp(0, 1).reshape(n, *SHAPE).to(dtype)


def test_round_trip():
    x = _data()
    zca = ZCA().fit(x)
    assert zca.fitted and zca.shape == SHAPE
    z = zca.transform(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert (zca.inverse(z) - x).abs().max() < 1e-4
    x64 = x.double()
    z64 = zca.transform(x64)
    assert z64.dtype == torch.float64
    assert (zca.inverse(z64) - x64).abs().max() < 1e-10
    # a single image (no batch dimension) works too
    torch.testing.assert_close(zca.transform(x64[0]), z64[0], rtol=0, atol=1e-12)


def test_matches_numpy_and_whitened_spectrum():
    x = _data()
    reg = 0.1
    zca = ZCA(regularization=reg).fit(x)
    X = x.double().reshape(len(x), -1).numpy()
    mu = X.mean(axis=0)
    S = np.cov(X, rowvar=False)  # unbiased, divides by N - 1
    s, U = np.linalg.eigh(S)
    W = U @ np.diag((s + reg) ** -0.5) @ U.T
    W_inv = U @ np.diag((s + reg) ** 0.5) @ U.T
    np.testing.assert_allclose(zca.mean.numpy(), mu, rtol=0, atol=1e-14)
    np.testing.assert_allclose(zca.eigenvalues.numpy(), s, rtol=0, atol=1e-12)
    np.testing.assert_allclose(zca.whitening_matrix.numpy(), W, rtol=0, atol=1e-9)
    np.testing.assert_allclose(zca.inverse_matrix.numpy(), W_inv, rtol=0, atol=1e-12)
    Z = zca.transform(x.double()).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(Z, (X - mu) @ W, rtol=0, atol=1e-9)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    # whitened covariance W S W has eigenvalues s / (s + reg)
    got = np.linalg.eigvalsh(np.cov(Z, rowvar=False))
    np.testing.assert_allclose(np.sort(got), np.sort(s / (s + reg)), rtol=0, atol=1e-10)
    assert got.max() < 1.0 and got.max() > 0.9  # the leading direction is nearly white


def test_chunked_fit_equals_one_shot():
    x = _data(n=301)
    one = ZCA(chunk_size=10_000).fit(x)
    for cs in (1, 7, 300):
        chunked = ZCA(chunk_size=cs).fit(x)
        torch.testing.assert_close(chunked.mean, one.mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(
            chunked.whitening_matrix, one.whitening_matrix, rtol=0, atol=1e-9
        )
        torch.testing.assert_close(chunked.inverse_matrix, one.inverse_matrix, rtol=0, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    x = _data()
    zca = ZCA().fit(x)
    path = zca.save(tmp_path / "sub" / "zca.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["zca.pt"]  # no temp file left
    loaded = ZCA.load(path)
    assert loaded.fingerprint == zca.fingerprint and len(zca.fingerprint) == 16
    assert loaded.regularization == zca.regularization and loaded.shape == zca.shape
    assert torch.equal(loaded.transform(x), zca.transform(x))
    assert torch.equal(loaded.inverse(x), zca.inverse(x))
    state_copy = ZCA().load_state_dict(zca.state_dict())
    assert state_copy.fingerprint == zca.fingerprint
    # the fingerprint identifies the transform
    assert ZCA(regularization=0.2).fit(x).fingerprint != zca.fingerprint
    assert ZCA().fit(_data(seed=1)).fingerprint != zca.fingerprint
    assert ZCA().fit(x).fingerprint == zca.fingerprint


def test_transform_is_differentiable():
    zca = ZCA().fit(_data())
    x = _data(n=4, seed=2).double().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (zca.transform(x) * g).sum().backward()
    expected = (g.reshape(4, -1) @ zca.whitening_matrix.T).reshape(x.shape)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


def test_errors():
    zca = ZCA()
    assert not zca.fitted
    with pytest.raises(RuntimeError, match="call fit"):
        zca.transform(_data(n=2))
    with pytest.raises(RuntimeError, match="call fit"):
        _ = zca.fingerprint
    zca.fit(_data(n=50))
    with pytest.raises(ValueError, match=r"3, 4, 4"):
        zca.transform(torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"3, 4, 4"):
        zca.inverse(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="at least 2"):
        ZCA().fit(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ZCA().fit(torch.zeros(10, 48))
    with pytest.raises(ValueError, match="missing"):
        ZCA().load_state_dict({"mean": torch.zeros(3)})


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Held splits whiten a whole split, streamed ones a batch or a few rows: each row must
    come out bit for bit the same (a BLAS's kernels for a product of a few rows sum in
    another order: without the fixed row blocks, 1 to 6 rows differed on an AMD EPYC)."""
    g = torch.Generator().manual_seed(0)
    zca = ZCA(0.1).fit(torch.rand(500, 3, 8, 8, generator=g))
    x = torch.rand(200, 3, 8, 8, generator=g)
    whole, back = zca.transform(x), zca.inverse(x)
    for m in (1, 2, 3, 6, 17, 64, 65):
        assert torch.equal(zca.transform(x[:m]), whole[:m]), m
        assert torch.equal(zca.inverse(x[:m]), back[:m]), m
    perm = torch.randperm(200, generator=g)
    assert torch.equal(zca.transform(x[perm]), whole[perm])
    assert zca.transform(x[:0]).shape == (0, 3, 8, 8)
