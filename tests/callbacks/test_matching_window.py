"""MatchingWindow: DATM's difficulty-aligned start-epoch window
(docs/method.md, 'Matching window')."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.callbacks.matching_window import MatchingWindow


def reference_ub(it: int, t_min: int, t: int, t_plus: int, end: int, sequential: bool) -> int:
    """UB = min(T+, T + floor((T+ - T) * it / expansion_end)), or T+ without sequential."""
    if not sequential:
        return t_plus
    return min(t_plus, t + (t_plus - t) * it // end)


@pytest.mark.parametrize("it, expected", [(0, 10), (1, 10), (99, 10), (100, 11), (250, 12),
                                          (499, 14), (500, 15), (999, 19), (1000, 20),
                                          (5000, 20)])
def test_upper_bound_follows_the_formula(it, expected):
    w = MatchingWindow(min_start_epoch=2, current_max_start_epoch=10, max_start_epoch=20,
                       expansion_end=1000, sequential=True)
    assert w.upper_bound(it) == expected == reference_ub(it, 2, 10, 20, 1000, True)


def test_upper_bound_without_sequential_generation_is_t_plus():
    w = MatchingWindow(min_start_epoch=0, max_start_epoch=20)
    assert [w.upper_bound(it) for it in (0, 10, 10_000)] == [20, 20, 20]
    # MTT: T- = 0, uniform on {0, ..., T+ - 1}
    g = torch.Generator().manual_seed(0)
    draws = [w.sample(it, g) for it in range(400)]
    assert min(draws) == 0 and max(draws) == 19


def test_samples_lie_in_the_window_and_cover_it():
    w = MatchingWindow(3, 5, 9, 40, sequential=True)
    g = torch.Generator().manual_seed(1)
    for it in (0, 13, 26, 40, 100):
        ub = reference_ub(it, 3, 5, 9, 40, True)
        draws = {w.sample(it, g) for _ in range(300)}
        assert draws == set(range(3, ub)), (it, ub)
        assert w.last_iteration == it and w.last_upper_bound == ub
    # the same generator state gives the same draw
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [w.sample(7, a) for _ in range(5)] == [w.sample(7, b) for _ in range(5)]


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="needs current_max_start_epoch and expansion_end"):
        MatchingWindow(0, None, 10, 100, sequential=True)
    with pytest.raises(ValueError, match="min_start_epoch < current_max_start_epoch"):
        MatchingWindow(5, 5, 10, 100, sequential=True)
    with pytest.raises(ValueError, match=r"max_start_epoch \(3\) must exceed"):
        MatchingWindow(3, max_start_epoch=3)
    with pytest.raises(ValueError, match="expansion_end must be > 0"):
        MatchingWindow(0, 2, 10, 0, sequential=True)


def test_state_round_trip_and_refusal_of_another_window():
    w = MatchingWindow(1, 4, 8, 10, sequential=True)
    w.sample(6, torch.Generator().manual_seed(0))
    state = w.state_dict()
    assert state["last_iteration"] == 6 and state["last_upper_bound"] == 6
    other = MatchingWindow(1, 4, 8, 10, sequential=True)
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="resume with the same window"):
        MatchingWindow(1, 4, 9, 10, sequential=True).load_state_dict(state)
    assert w.max_reachable_start == 7
