"""Tests of the start-epoch window (docs/method.md, 'Matching window') and the minibatch
sampler ('Matching loss', step 2)."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.functional import (
    sample_minibatches,
    sample_start_epoch,
    window_upper_bound,
)


@pytest.mark.parametrize(
    ("it", "expected"),
    # T- = 0, T = 20, T+ = 40, expansion_end = 100: UB = min(40, 20 + floor(20 it / 100))
    [(0, 20), (1, 20), (4, 20), (5, 21), (50, 30), (99, 39), (100, 40), (5000, 40)],
)
def test_window_upper_bound_formula(it, expected):
    assert window_upper_bound(it, 0, 20, 40, 100) == expected


def test_window_upper_bound_datm_cifar10_and_off():
    # DATM CIFAR-10 ipc10-like numbers: T- = 0, T = 20, T+ = 40, expansion_end = 2000
    assert window_upper_bound(1000, 0, 20, 40, 2000) == 30
    assert window_upper_bound(1999, 0, 20, 40, 2000) == 39
    assert window_upper_bound(1999, 0, 20, 40, 2000, sequential=False) == 40
    # MTT: T- = 0, no sequential generation
    assert window_upper_bound(0, 0, 0, 20, 0, sequential=False) == 20


def test_sample_start_epoch_range_and_coverage():
    g = torch.Generator().manual_seed(0)
    draws = [sample_start_epoch(50, 3, 6, 10, 100, generator=g) for _ in range(400)]
    # UB = min(10, 6 + floor(4 * 50 / 100)) = 8: uniform on {3, ..., 7}
    assert set(draws) == {3, 4, 5, 6, 7}
    counts = torch.bincount(torch.tensor(draws))[3:]
    assert counts.min() > 50  # 80 expected each
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [sample_start_epoch(0, 0, 4, 9, 10, generator=g1) for _ in range(20)]
    b = [sample_start_epoch(0, 0, 4, 9, 10, generator=g2) for _ in range(20)]
    assert a == b and max(a) <= 3


def test_window_errors():
    with pytest.raises(ValueError, match="min_start_epoch < current_max_start_epoch"):
        window_upper_bound(0, 5, 5, 10, 100)
    with pytest.raises(ValueError, match="current_max_start_epoch <= max_start_epoch"):
        window_upper_bound(0, 0, 11, 10, 100)
    with pytest.raises(ValueError, match="must exceed min_start_epoch"):
        window_upper_bound(0, 10, 10, 10, 100, sequential=False)
    with pytest.raises(ValueError, match="expansion_end must be > 0"):
        window_upper_bound(0, 0, 5, 10, 0)
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        sample_start_epoch(-1, 0, 5, 10, 100)


def test_minibatches_cover_each_permutation():
    g = torch.Generator().manual_seed(0)
    batches = sample_minibatches(10, 3, 9, generator=g)
    assert [len(b) for b in batches] == [3, 3, 3, 1, 3, 3, 3, 1, 3]
    assert all(b.dtype == torch.int64 for b in batches)
    first, second = torch.cat(batches[:4]), torch.cat(batches[4:8])
    assert torch.equal(first.sort().values, torch.arange(10))
    assert torch.equal(second.sort().values, torch.arange(10))
    assert not torch.equal(first, second)  # a fresh permutation
    again = sample_minibatches(10, 3, 9, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    big = sample_minibatches(4, 100, 3, generator=g)
    assert all(torch.equal(b.sort().values, torch.arange(4)) for b in big)
    with pytest.raises(ValueError, match="must be positive"):
        sample_minibatches(0, 3, 2)
