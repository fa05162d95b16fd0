"""EL2N scores and PAD's easy-to-hard schedule (functional/difficulty.py), against numbers
computed by hand from the formulas in the module docstring."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.functional import (
    PADSchedule,
    PADSelection,
    class_difficulty_order,
    el2n_scores,
    pad_selection,
    pad_subset_bounds,
    pad_subset_sizes,
)


def test_el2n_matches_a_hand_computation():
    # softmax by hand: [0,0,0] -> 1/3 each; [ln2,0,0] -> [1/2,1/4,1/4]; [0,ln3,0] -> [1/5,3/5,1/5]
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, math.log(3), 0.0]])
    labels = torch.tensor([0, 0, 2])
    expected = torch.tensor([
        math.sqrt((2 / 3) ** 2 + (1 / 3) ** 2 + (1 / 3) ** 2),  # 0.8165
        math.sqrt(0.5**2 + 0.25**2 + 0.25**2),                 # 0.6124
        math.sqrt(0.2**2 + 0.6**2 + 0.8**2),                   # 1.0198
    ])
    got = el2n_scores(logits, labels)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert float(got[1]) < float(got[0]) < float(got[2])  # higher = harder


def test_el2n_bounds_and_shape_errors():
    # a confident right answer scores ~0, a confident wrong one ~sqrt(2)
    logits = torch.tensor([[30.0, 0.0], [0.0, 30.0]])
    got = el2n_scores(logits, torch.tensor([0, 0]))
    torch.testing.assert_close(got, torch.tensor([0.0, math.sqrt(2)]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logits must be"):
        el2n_scores(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        el2n_scores(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# PAD's CIFAR-10 values: IR 0.75, AEE 20, rm1 40, rm2 60, r1 0.1, r2 0.2. By hand:
#   n = 5000: e<=20: floor((0.75 + 0.25 e / 20) * 5000); 21..40: 5000; 41..60: 5000 - 500;
#             61..: 5000 - 1000.
#   n = 37:   e = 0: floor(27.75) = 27; e = 10: floor(0.875 * 37 = 32.375) = 32;
#             e = 19: floor(0.9875 * 37 = 36.5375) = 36; 41..60: 37 - floor(3.7) = 34;
#             61..: 37 - floor(7.4) = 30.
CIFAR10_SIZES = {
    0: (3750, 27),
    1: (3812, 28),   # p = 0.7625: 3812.5 -> 3812; 28.2125 -> 28
    10: (4375, 32),
    19: (4937, 36),  # 0.9875 * 5000 = 4937.5
    20: (5000, 37),  # e = AEE: p = 1
    21: (5000, 37),  # AEE < e <= rm1: all
    40: (5000, 37),  # e = rm1: still all
    41: (4500, 34),  # rm1 < e <= rm2: drop the easiest 10%
    60: (4500, 34),  # e = rm2: still r1
    61: (4000, 30),  # e > rm2: drop the easiest 20%
    99: (4000, 30),
}


@pytest.mark.parametrize("epoch", sorted(CIFAR10_SIZES))
def test_schedule_sizes_for_two_class_sizes(epoch):
    sizes = pad_subset_sizes([5000, 37], epoch, PADSchedule())
    assert sizes.tolist() == list(CIFAR10_SIZES[epoch])


def test_schedule_bounds_keep_easiest_then_drop_easiest():
    s = PADSchedule()
    assert pad_subset_bounds([5000, 37], 0, s).tolist() == [[0, 3750], [0, 27]]
    assert pad_subset_bounds([5000, 37], 30, s).tolist() == [[0, 5000], [0, 37]]
    assert pad_subset_bounds([5000, 37], 41, s).tolist() == [[500, 5000], [3, 37]]
    assert pad_subset_bounds([5000, 37], 61, s).tolist() == [[1000, 5000], [7, 37]]


def test_schedule_aee_40_cifar100_class_size():
    # CIFAR-100 / Tiny: AEE 40 (rm1 40, rm2 60). n = 450 (a CIFAR-100 class after a 10%
    # validation split): e=0: floor(337.5)=337; e=20: p=0.875, floor(393.75)=393;
    # e=39: p=0.75+0.25*39/40=0.99375, floor(447.1875)=447; e=40: 450; e=41: 450-45=405;
    # e=61: 450-90=360.
    s = PADSchedule(add_end_epoch=40)
    got = {e: int(pad_subset_sizes([450], e, s)) for e in (0, 20, 39, 40, 41, 60, 61)}
    assert got == {0: 337, 20: 393, 39: 447, 40: 450, 41: 405, 60: 405, 61: 360}


def test_schedule_floors_the_written_decimals_exactly():
    # 0.29 * 100 is 28.999999999999996 in binary floating point, 57 - 0.57 * 100 likewise
    assert math.floor(0.29 * 100) == 28 and math.floor(0.57 * 100) == 56
    s = PADSchedule(initial_ratio=0.29, add_end_epoch=10, remove_epochs=(10, 10),
                    remove_ratios=(0.57, 0.57))
    assert int(pad_subset_sizes([100], 0, s)) == 29
    assert int(pad_subset_sizes([100], 11, s)) == 100 - 57


def test_schedule_edge_cases_and_validation():
    # AEE = 0: everything from epoch 0; zero-sized classes stay empty
    s = PADSchedule(initial_ratio=0.5, add_end_epoch=0, remove_epochs=(0, 5),
                    remove_ratios=(0.0, 0.5))
    assert pad_subset_sizes([10, 0], 0, s).tolist() == [10, 0]
    assert pad_subset_sizes([10, 0], 1, s).tolist() == [10, 0]  # r1 = 0
    assert pad_subset_sizes([10, 0], 6, s).tolist() == [5, 0]
    for bad in (dict(initial_ratio=0.0), dict(initial_ratio=1.5),
                dict(add_end_epoch=50), dict(remove_epochs=(60, 40)),
                dict(remove_ratios=(0.3, 0.2)), dict(remove_ratios=(0.1, 1.0)),
                dict(remove_epochs=(40,))):
        with pytest.raises(ValueError, match="PADSchedule"):
            PADSchedule(**bad)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        pad_subset_sizes([10], -1)


# Two classes by hand. Class 0: indices [0, 2, 4, 6], scores [.5, .2, .2, .7] -> easiest
# first [2, 4, 0, 6] (2 before 4: equal scores in index order). Class 1: [1, 3, 5],
# scores [.1, .9, .3] -> [1, 5, 3].
SCORES = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.2, 0.3, 0.7])
LABELS = torch.tensor([0, 1, 0, 1, 0, 1, 0])


def test_class_order_is_easiest_first_with_index_tie_break():
    orders = class_difficulty_order(SCORES, LABELS)
    assert [o.tolist() for o in orders] == [[2, 4, 0, 6], [1, 5, 3]]
    assert [o.tolist() for o in class_difficulty_order(SCORES, LABELS, num_classes=3)] == [
        [2, 4, 0, 6], [1, 5, 3], []]


def test_selection_picks_the_easiest_of_each_class():
    # IR 0.5, AEE 2, rm (3, 4), r (0.25, 0.5); class sizes 4 and 3
    s = PADSchedule(initial_ratio=0.5, add_end_epoch=2, remove_epochs=(3, 4),
                    remove_ratios=(0.25, 0.5))
    expected = {
        0: [1, 2, 4],              # floor(2) of class 0 -> {2, 4}; floor(1.5) of class 1 -> {1}
        1: [0, 1, 2, 4, 5],        # p = 0.75: 3 -> {2, 4, 0}; floor(2.25) = 2 -> {1, 5}
        2: [0, 1, 2, 3, 4, 5, 6],  # e = AEE: all
        3: [0, 1, 2, 3, 4, 5, 6],  # e = rm1: all
        4: [0, 1, 3, 4, 5, 6],     # drop floor(1) of class 0 -> {2}; floor(0.75) = 0 of class 1
        5: [0, 3, 5, 6],           # drop floor(2) -> {2, 4}; floor(1.5) = 1 -> {1}
    }
    select = PADSelection(SCORES, LABELS, s)
    for epoch, idx in expected.items():
        assert select(epoch).tolist() == idx, epoch
        assert pad_selection(SCORES, LABELS, epoch, s).tolist() == idx, epoch
        assert select.sizes(epoch).sum() == len(idx)
    # the cut splits the tie at 0.2: index 2 (the lower) is kept, 4 is not
    s_tie = PADSchedule(initial_ratio=0.25, add_end_epoch=2, remove_epochs=(3, 4),
                        remove_ratios=(0.25, 0.5))
    assert pad_selection(SCORES, LABELS, 0, s_tie).tolist() == [2]  # class 1: floor(.75) = 0


def test_selection_rejects_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        pad_selection(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="both be"):
        pad_selection(torch.zeros(3), torch.zeros(2, dtype=torch.long), 0)
