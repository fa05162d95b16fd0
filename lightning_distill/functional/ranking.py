"""DD-Ranking's scores of a synthetic set, as pure functions (docs/method.md,
'DD-Ranking's scores').

DD-Ranking (Li, Zhong et al., 2025, "DD-Ranking: Rethinking the Evaluation of Dataset
Distillation", and its package ``ddranking``) separates what a set's images are worth
from what its labels and augmentation add:

- hard-label recovery ``HLR = acc(full data, hard labels) - acc(set's images, hard
  labels)``: how much of the full data's accuracy the images alone fall short of
  (lower is better);
- improvement over random ``IOR = acc(set) - acc(random real subset of the same size,
  given the same kind of labels, same protocol)`` (higher is better);
- the label-robust score ``LRS = f(w IOR - (1 - w) HLR)`` and the augmentation-robust
  score ``ARS = f(w IOR_with_aug + (1 - w) IOR_without_aug)``, both with ``w = 0.5`` and
  ``f(a) = (e^a - e^-1) / (e - e^-1)``, which maps a in [-1, 1] onto [0, 1].

Units: every accuracy here is a fraction in [0, 1] (as results.json holds them), so
HLR and IOR are in [-1, 1] and LRS and ARS in [0, 1]; tables show HLR and IOR in
percentage points and LRS and ARS times 100. DD-Ranking's package computes HLR and IOR
from accuracies in percent and feeds them to ``f`` as they are, where ``f`` saturates
(an IOR of 10 points gives e^5); its normalisation by e^-1 and e is that of a in [-1, 1],
i.e. of fractions, which is what we follow.

DD-Ranking scores every evaluation run: run r's scores pair run r of each training
(here: the same run seed), and the reported value is their mean and population
standard deviation over the runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import InputError
from .evaluation import summarize

__all__ = [
    "ARS_WEIGHT",
    "LRS_WEIGHT",
    "augmentation_robust_score",
    "exp_score",
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
    "ranking_scores",
]

#: DD-Ranking's default weight of IOR against HLR in LRS, and of the IOR with
#: augmentation against the one without in ARS
LRS_WEIGHT = 0.5
ARS_WEIGHT = 0.5


def _fraction(value: float, what: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{what}: accuracy {v} is not a fraction in [0, 1] (DD-Ranking's "
                         "scores here take fractions, not percent)")
    return v


def _weight(w: float) -> float:
    if not 0.0 <= float(w) <= 1.0:
        raise InputError(f"the weight must be in [0, 1], got {w}")
    return float(w)


def exp_score(a: float) -> float:
    """``(e^a - e^-1) / (e - e^-1)``: 0 at a = -1, 1 at a = 1."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def hard_label_recovery(full_hard: float, syn_hard: float) -> float:
    """HLR: the full data's accuracy with hard labels minus the set's images' with hard
    labels (fractions; lower is better)."""
    return _fraction(full_hard, "HLR, full data") - _fraction(syn_hard, "HLR, synthetic")


def improvement_over_random(syn: float, random: float) -> float:
    """IOR: the set's accuracy minus a random real subset's with the same kind of labels
    under the same protocol (fractions; higher is better)."""
    return _fraction(syn, "IOR, synthetic") - _fraction(random, "IOR, random")


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """LRS = exp_score(weight IOR - (1 - weight) HLR), in [0, 1]."""
    w = _weight(weight)
    return exp_score(w * float(ior) - (1.0 - w) * float(hlr))


def augmentation_robust_score(ior_with_aug: float, ior_without_aug: float,
                              weight: float = ARS_WEIGHT) -> float:
    """ARS = exp_score(weight IOR_with_aug + (1 - weight) IOR_without_aug), in [0, 1]."""
    w = _weight(weight)
    return exp_score(w * float(ior_with_aug) + (1.0 - w) * float(ior_without_aug))


def _summary(values: list[float]) -> dict:
    mean, std = summarize(values)
    return {"values": values, "mean": mean, "std": std}


def ranking_scores(*, syn: Sequence[float], syn_hard: Sequence[float],
                   random: Sequence[float], syn_other_aug: Sequence[float],
                   random_other_aug: Sequence[float], full_hard: Sequence[float] | None,
                   protocol_augments: bool = True, lrs_weight: float = LRS_WEIGHT,
                   ars_weight: float = ARS_WEIGHT) -> dict[str, dict | None]:
    """The scores of one set, run by run, and their mean and population std.

    Each argument holds one accuracy per run (run r of every list trained with the same
    run seed): ``syn`` the set under the protocol, ``syn_hard`` its images with hard
    labels, ``random`` random subsets with the same kind of labels, ``syn_other_aug`` /
    ``random_other_aug`` both again with the augmentation switched (off when the
    protocol augments, ``protocol_augments``, on when it does not), ``full_hard`` the
    full data with hard labels (None: HLR and LRS are None).

    Returns ``{"hlr", "ior", "ior_other_aug", "lrs", "ars"}``, each ``{"values": [...],
    "mean", "std"}`` or None."""
    lists = [syn, syn_hard, random, syn_other_aug, random_other_aug]
    if full_hard is not None:
        lists.append(full_hard)
    runs = {len(x) for x in lists}
    if len(runs) != 1 or 0 in runs:
        raise InputError(f"ranking_scores: every accuracy list needs one entry per run, "
                         f"got lengths {[len(x) for x in lists]}")
    ior = [improvement_over_random(s, r) for s, r in zip(syn, random, strict=True)]
    other = [improvement_over_random(s, r)
             for s, r in zip(syn_other_aug, random_other_aug, strict=True)]
    with_aug, without_aug = (ior, other) if protocol_augments else (other, ior)
    ars = [augmentation_robust_score(a, b, ars_weight)
           for a, b in zip(with_aug, without_aug, strict=True)]
    out: dict[str, dict | None] = {"hlr": None, "ior": _summary(ior),
                                   "ior_other_aug": _summary(other), "lrs": None,
                                   "ars": _summary(ars)}
    if full_hard is not None:
        hlr = [hard_label_recovery(f, s) for f, s in zip(full_hard, syn_hard, strict=True)]
        out["hlr"] = _summary(hlr)
        out["lrs"] = _summary([label_robust_score(h, i, lrs_weight)
                               for h, i in zip(hlr, ior, strict=True)])
    return out
