"""DD-Ranking's scores (functional/ranking.py) against values computed by hand:
f(a) = (e^a - e^-1) / (e - e^-1); f(0) = 1 / (1 + e) = 0.2689414,
f(0.35) = (1.4190675 - 0.3678794) / 2.3504024 = 0.4472375,
f(0.05) = (1.0512711 - 0.3678794) / 2.3504024 = 0.2907552,
f(0.125) = (1.1331485 - 0.3678794) / 2.3504024 = 0.3255906."""

from __future__ import annotations

import math

import pytest

from lightning_distill.errors import InputError
from lightning_distill.functional.ranking import (
    augmentation_robust_score,
    exp_score,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    ranking_scores,
)


def test_the_exponential_map_sends_minus_one_to_zero_and_one_to_one():
    assert exp_score(-1.0) == pytest.approx(0.0, abs=1e-15)
    assert exp_score(1.0) == pytest.approx(1.0, abs=1e-15)
    assert exp_score(0.0) == pytest.approx(1 / (1 + math.e), abs=1e-15)  # 0.2689414


def test_single_scores_by_hand():
    assert hard_label_recovery(0.9, 0.6) == pytest.approx(0.3)
    assert improvement_over_random(0.8, 0.5) == pytest.approx(0.3)
    assert label_robust_score(0.3, 0.3) == pytest.approx(0.2689414, abs=1e-7)  # a = 0
    assert label_robust_score(0.1, 0.2) == pytest.approx(0.2907552, abs=1e-7)  # a = 0.05
    assert augmentation_robust_score(0.3, 0.4) == pytest.approx(0.4472375, abs=1e-7)
    # the weight: all on IOR, LRS = f(IOR); all on HLR, LRS = f(-HLR)
    assert label_robust_score(0.3, 0.5, weight=1.0) == pytest.approx(exp_score(0.5))
    assert label_robust_score(0.3, 0.5, weight=0.0) == pytest.approx(exp_score(-0.3))


def test_accuracies_in_percent_are_refused():
    with pytest.raises(InputError, match="not a fraction"):
        improvement_over_random(80.0, 50.0)


def test_run_by_run_scores_their_mean_and_population_std():
    # run 0: HLR .9-.6=.3, IOR .8-.5=.3, LRS f(0)=.2689414, IOR no aug .7-.3=.4,
    #        ARS f(.35)=.4472375
    # run 1: HLR .9-.8=.1, IOR .7-.5=.2, LRS f(.05)=.2907552, IOR no aug .6-.55=.05,
    #        ARS f(.125)=(1.1331485-.3678794)/2.3504024=.3255906
    s = ranking_scores(syn=[0.8, 0.7], syn_hard=[0.6, 0.8], random=[0.5, 0.5],
                       syn_other_aug=[0.7, 0.6], random_other_aug=[0.3, 0.55],
                       full_hard=[0.9, 0.9])
    assert s["hlr"]["values"] == pytest.approx([0.3, 0.1])
    assert (s["hlr"]["mean"], s["hlr"]["std"]) == pytest.approx((0.2, 0.1))
    assert (s["ior"]["mean"], s["ior"]["std"]) == pytest.approx((0.25, 0.05))
    assert s["ior_other_aug"]["values"] == pytest.approx([0.4, 0.05])
    assert s["lrs"]["values"] == pytest.approx([0.2689414, 0.2907552], abs=1e-7)
    assert s["lrs"]["mean"] == pytest.approx(0.2798483, abs=1e-7)
    assert s["lrs"]["std"] == pytest.approx(0.0109069, abs=1e-7)
    assert s["ars"]["values"] == pytest.approx([0.4472375, 0.3255906], abs=1e-7)
    assert s["ars"]["mean"] == pytest.approx(0.3864141, abs=1e-7)
    assert s["ars"]["std"] == pytest.approx(0.0608234, abs=1e-7)


def test_without_augmentation_in_the_protocol_the_other_runs_are_the_augmented_ones():
    s = ranking_scores(syn=[0.7], syn_hard=[0.6], random=[0.3], syn_other_aug=[0.8],
                       random_other_aug=[0.5], full_hard=None, protocol_augments=False)
    # with augmentation .8-.5=.3, without .7-.3=.4: ARS f(.5*.3+.5*.4)=f(.35)
    assert s["ars"]["values"] == pytest.approx([0.4472375], abs=1e-7)
    assert s["hlr"] is None and s["lrs"] is None  # no full-data accuracy


def test_lists_of_different_lengths_are_refused():
    with pytest.raises(InputError, match="one entry per run"):
        ranking_scores(syn=[0.5], syn_hard=[0.5, 0.5], random=[0.5], syn_other_aug=[0.5],
                       random_other_aug=[0.5], full_hard=None)
