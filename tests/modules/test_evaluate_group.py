"""Evaluation runs trained as one batched model (group_size > 1): the same accuracies as
one at a time (within one test image per run), the same through EvalModule + Trainer,
one training set per run (random-real baseline), and the EvalProtocol argument."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_distill.callbacks import PeriodicEvaluation
from lightning_distill.data.augment import make_dsa
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import EvalProtocol
from lightning_distill.modules.evaluate import EvalModule, evaluate_synthetic

MKW = {"ConvNet": {"width": 8, "depth": 2}}


@pytest.fixture(scope="module")
def digits():
    dm = RealDataModule("digits")
    dm.setup()
    return dm


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        yield


def _subset(dm, ipc, seed):
    x, y = dm.train_set.tensors
    return SyntheticSet.from_real(x, y, ipc, 10, generator=torch.Generator().manual_seed(seed),
                                  lr=0.02, meta={"dataset": "digits"})


def test_batched_runs_reach_the_accuracies_of_one_at_a_time_runs(digits):
    """Measured on this setting: identical accuracies (the float32 rounding differences
    never flip a test prediction here); the tolerance is one test image per run."""
    syn = _subset(digits, 10, 0)
    tx, ty = digits.test_set.tensors
    kw = dict(runs=4, seed=3, epochs=30, batch_size=64, model_kwargs=MKW, device="cpu")
    single = evaluate_synthetic(syn, tx, ty, group_size=1, **kw)["ConvNet"]["accs"]
    group = evaluate_synthetic(syn, tx, ty, group_size=4, **kw)["ConvNet"]["accs"]
    n = ty.numel()
    print("one at a time", single, "group", group)
    assert max(abs(a - b) * n for a, b in zip(single, group, strict=True)) <= 1 + 1e-9
    assert len(set(single)) > 1  # different seeds, different networks
    # group_size 3 over 4 runs: a group of 3 and the plain loop for the last one
    mixed = evaluate_synthetic(syn, tx, ty, group_size=3, **kw)["ConvNet"]["accs"]
    assert mixed[3] == single[3]
    assert max(abs(a - b) * n for a, b in zip(single, mixed, strict=True)) <= 1 + 1e-9


def test_loop_backend_runs_are_bit_identical_to_one_at_a_time_runs(digits):
    """The backend a CPU group of larger steps runs with (``"loop"``): the same
    accuracies as the plain loop, with DSA, momentum, weight decay and the lr drop (the
    parameters are bit for bit the plain loop's, tests/functional/test_batched.py); the
    reported losses agree to float32 rounding, since the group sums the members'
    cross-entropies in one vectorised call."""
    from lightning_distill.functional.evaluation import (
        run_seeds,
        seeded_model,
        train_and_evaluate,
        train_and_evaluate_group,
    )

    syn = _subset(digits, 10, 0)
    tx, ty = digits.test_set.tensors
    dsa = make_dsa(True, None, False)
    kw = dict(lr=0.02, epochs=6, batch_size=64, lr_decay_epoch=3, augment=dsa,
              test_images=tx, test_labels=ty)
    seeds = [run_seeds(s) for s in (4, 5, 6)]

    def nets():
        return [seeded_model("ConvNet", 1, 10, 8, seed=i, width=8, depth=2) for i, _, _ in seeds]

    def gens(j):
        return [torch.Generator().manual_seed(s[j]) for s in seeds]

    single = [train_and_evaluate(n, syn.images, syn.labels, generator=g, augment_generator=d,
                                 **kw)
              for n, g, d in zip(nets(), gens(1), gens(2), strict=True)]
    group = train_and_evaluate_group(nets(), syn.images, syn.labels, generators=gens(1),
                                     augment_generators=gens(2), backend="loop", **kw)
    for a, b in zip(single, group, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["class_accuracy"] == b["class_accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert len({r["loss"] for r in single}) == 3  # three different networks


def test_one_training_set_per_run_equals_each_run_on_its_own_set(digits):
    sets = [_subset(digits, 2, s) for s in range(3)]
    tx, ty = digits.test_set.tensors
    kw = dict(epochs=20, batch_size=16, model_kwargs=MKW, device="cpu", lr=0.02)
    group = evaluate_synthetic(sets[0], tx, ty, runs=3, seed=7, group_size=3,
                               train_sets=[(s.images, s.labels) for s in sets], **kw)
    singles = [evaluate_synthetic(s, tx, ty, runs=1, seed=7 + r, group_size=1, **kw)
               for r, s in enumerate(sets)]
    for r in range(3):
        assert abs(group["ConvNet"]["accs"][r] - singles[r]["ConvNet"]["accs"][0]) * ty.numel() \
            <= 1 + 1e-9


def test_eval_module_group_through_a_trainer_equals_the_plain_group_loop(digits):
    syn = _subset(digits, 3, 1)
    tx, ty = digits.test_set.tensors[0][:200], digits.test_set.tensors[1][:200]
    kw = dict(runs=3, seed=2, epochs=6, batch_size=8, model_kwargs=MKW, device="cpu",
              group_size=3)
    plain = evaluate_synthetic(syn, tx, ty, **kw)["ConvNet"]["accs"]
    trainer = evaluate_synthetic(syn, tx, ty, use_trainer=True, **kw)["ConvNet"]["accs"]
    assert trainer == plain


def test_the_protocol_is_one_argument_with_keyword_overrides(digits):
    p = EvalProtocol(epochs=7, batch_size=32, group_size=2)
    m = EvalModule(_subset(digits, 1, 0), model_kwargs={"width": 4, "depth": 2}, protocol=p,
                   seed=[1, 2], lr_decay_epoch=3)
    assert m.protocol == EvalProtocol(epochs=7, batch_size=32, group_size=2, lr_decay_epoch=3)
    assert m.epochs == 7 and m.decay_epoch == 3 and m.grouped and m.net.members == 2
    with pytest.raises(TypeError, match="unknown keyword.*'epoch'"):
        EvalModule(_subset(digits, 1, 0), epoch=3)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        EvalProtocol(group_size=0)
    vx, vy = digits.val_set.tensors
    cb = PeriodicEvaluation(vx, vy, runs=3, protocol=p, model_kwargs={"width": 4, "depth": 2})
    assert cb.protocol is p and cb.epochs == 7
    syn = _subset(digits, 1, 0)
    accs = cb.evaluate(syn)
    again = p.train_runs("ConvNet", {"width": 4, "depth": 2}, [0, 1, 2], syn.images,
                         syn.labels, set_lr=syn.lr, num_classes=10, test_images=vx,
                         test_labels=vy, augment=make_dsa("digits"))
    assert accs == again


def test_progress_is_reported_every_epoch_and_sums_to_the_runs(digits):
    """on_progress gets K / E runs' worth after every epoch of a group (plain and grouped),
    so a bar moves during a long evaluation; it adds up to the runs and changes nothing."""
    p = EvalProtocol(epochs=4, batch_size=32, group_size=2)
    syn = _subset(digits, 1, 0)
    vx, vy = digits.val_set.tensors
    seen: list[float] = []
    kw = dict(set_lr=syn.lr, num_classes=10, test_images=vx, test_labels=vy)
    args = ("ConvNet", {"width": 4, "depth": 2}, [0, 1, 2], syn.images, syn.labels)
    with_bar = p.train_runs(*args, **kw, on_progress=seen.append)
    # runs 0, 1 as a group of two (2/4 per epoch), then run 2 alone (1/4 per epoch)
    assert seen == [0.5] * 4 + [0.25] * 4 and sum(seen) == 3
    assert with_bar == p.train_runs(*args, **kw)


def test_group_size_null_chooses_by_device_and_step_size(digits, monkeypatch):
    """group_size None (the default): 8 on an accelerator; on a CPU 8 while a member's
    step (batch x H x W) is at most CPU_GROUP_MAX_PIXELS, else one at a time."""
    import lightning_distill.functional.evaluation as ev

    assert EvalProtocol().group_size is None
    assert ev.CPU_GROUP_MAX_PIXELS == 32768
    assert ev.auto_group_size("cpu", 100, (1, 8, 8)) == 8          # digits ipc 10: 6400
    assert ev.auto_group_size("cpu", 256, (1, 8, 8)) == 8          # digits ipc 50: 16384
    assert ev.auto_group_size("cpu", 512, (1, 8, 8)) == 8          # 32768: at the bound
    assert ev.auto_group_size("cpu", 513, (1, 8, 8)) == 1
    assert ev.auto_group_size("cpu", 10, (1, 28, 28)) == 8         # Fashion-MNIST ipc 1
    assert ev.auto_group_size("cpu", 100, (1, 28, 28)) == 1        # Fashion-MNIST ipc 10
    assert ev.auto_group_size(torch.device("cuda"), 256, (3, 32, 32)) == 8
    p = EvalProtocol(batch_size=256)
    # the step's batch is the set's size when the set is smaller than batch_size
    assert p.group_size_for("cpu", 100, (100, 1, 8, 8)) == 8
    assert p.group_size_for("cpu", 500, (500, 1, 8, 8)) == 8     # the step: 256 images
    assert p.group_size_for("cpu", 500, (500, 1, 28, 28)) == 1
    assert EvalProtocol(group_size=3).group_size_for("cpu", 500, (500, 1, 28, 28)) == 3
    # the runs follow it
    calls = []
    result = {"accuracy": 0.5, "loss": 0.0, "train_loss": 0.0, "class_accuracy": [0.5] * 10}

    def plain(net, x, y, **kw):
        calls.append(1)
        return dict(result)

    def group(nets, x, y, **kw):
        calls.append(len(nets))
        return [dict(result) for _ in nets]

    monkeypatch.setattr(ev, "train_and_evaluate", plain)
    monkeypatch.setattr(ev, "train_and_evaluate_group", group)
    tx, ty = digits.test_set.tensors
    monkeypatch.setattr(ev, "CPU_GROUP_MAX_PIXELS", 8192)  # digits ipc 50 above the bound
    for ipc, expect in ((10, [3]), (50, [1, 1, 1])):
        calls.clear()
        syn = _subset(digits, ipc, 0)
        evaluate_synthetic(syn, tx, ty, runs=3, epochs=1, model_kwargs=MKW, device="cpu")
        assert calls == expect, (ipc, calls)
