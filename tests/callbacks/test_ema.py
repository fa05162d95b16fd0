"""SyntheticEMA (FTD; docs/method.md, 'EMA of the synthetic images'):
the recursion, bias correction, state round trip."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.callbacks.ema import SyntheticEMA


def _steps(k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(k + 1)]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_uncorrected_equals_the_recursion_from_the_initial_images(decay):
    xs = _steps(7)
    ema = SyntheticEMA(decay=decay)
    ema._start(xs[0])
    e = xs[0].clone()  # E_0 = X_0
    for x in xs[1:]:
        ema.update(x)
        e = decay * e + (1 - decay) * x
        torch.testing.assert_close(ema.average, e, rtol=1e-13, atol=1e-14)
    assert ema.num_updates == 7


def test_bias_corrected_is_accumulator_over_one_minus_d_to_the_k():
    d = 0.9
    xs = _steps(5, seed=1)
    ema = SyntheticEMA(decay=d, bias_correction=True)
    ema._start(xs[0])
    assert torch.equal(ema.average, xs[0])  # before any step: the initial images
    a = torch.zeros_like(xs[0])
    for k, x in enumerate(xs[1:], start=1):
        ema.update(x)
        a = d * a + (1 - d) * x
        torch.testing.assert_close(ema.average, a / (1 - d**k), rtol=1e-13, atol=1e-14)
    # constant images: the corrected average is exactly them (no pull to the init)
    ema = SyntheticEMA(decay=0.99, bias_correction=True)
    ema._start(torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    c = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)
    for _ in range(3):
        ema.update(c)
    torch.testing.assert_close(ema.average, c, rtol=1e-13, atol=0)
    # the uncorrected one keeps 0.99^3 of the initialisation
    raw = SyntheticEMA(decay=0.99)
    raw._start(torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    for _ in range(3):
        raw.update(c)
    torch.testing.assert_close(raw.average, c * (1 - 0.99**3), rtol=1e-13, atol=0)


def test_state_round_trip():
    xs = _steps(3, seed=2)
    ema = SyntheticEMA(decay=0.8, bias_correction=True)
    ema._start(xs[0])
    for x in xs[1:3]:
        ema.update(x)
    state = ema.state_dict()
    other = SyntheticEMA(decay=0.5)
    other.load_state_dict(state)
    assert (other.decay, other.bias_correction, other.num_updates) == (0.8, True, 2)
    assert torch.equal(other.average, ema.average)
    ema.update(xs[3])
    other.update(xs[3])
    assert torch.equal(other.average, ema.average)
    empty = SyntheticEMA().state_dict()
    fresh = SyntheticEMA()
    fresh.load_state_dict(empty)
    assert fresh.initial is None
    with pytest.raises(RuntimeError, match="no images seen yet"):
        fresh.average  # noqa: B018


def test_decay_must_be_in_the_open_unit_interval():
    for d in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay must be in"):
            SyntheticEMA(decay=d)
