"""The plain evaluation loop (docs/method.md, 'Evaluation protocol'): schedule, momentum reset,
soft CE, ZCA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_distill.data.augment import make_dsa
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.data.zca import ZCA
from lightning_distill.functional.evaluation import (
    evaluate_accuracy,
    resolve_decay_epoch,
    run_seeds,
    seeded_model,
    summarize,
    train_and_evaluate,
)


def _linear(seed: int = 0, d: int = 8, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def _data(n: int = 10, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 2, 2, generator=g), torch.arange(n) % k


def test_summarize_population_std():
    mean, std = summarize([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6, abs=1e-15)
    assert std == pytest.approx(0.1 * math.sqrt(2.0 / 3.0), abs=1e-15)  # ddof = 0
    assert std == pytest.approx(float(np.std([0.5, 0.6, 0.7])), abs=0)
    assert summarize([0.42]) == (0.42, 0.0)
    with pytest.raises(ValueError, match="no accuracies"):
        summarize([])


def test_evaluate_accuracy_known_numbers():
    net = nn.Flatten()  # logits = the 2 input features
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    y = torch.tensor([0, 1, 1, 1, 0])  # predictions 0, 1, 0, 1, 0 -> 4 / 5 correct
    x = x.reshape(5, 2, 1, 1)
    assert evaluate_accuracy(net, x, y, batch_size=2) == 0.8
    assert evaluate_accuracy(net, x, y, batch_size=1024) == 0.8


def test_decay_epoch_rule():
    assert resolve_decay_epoch(1000, None) == 500
    assert resolve_decay_epoch(4, None) == 2
    assert resolve_decay_epoch(1, None) is None  # nothing to decay
    assert resolve_decay_epoch(10, 0) is None and resolve_decay_epoch(10, 10) is None
    assert resolve_decay_epoch(10, 3) == 3


def test_lr_drops_10x_at_half_and_optimizer_is_recreated():
    x, y = _data()
    net = _linear()
    seen = []

    def record(epoch, opt):
        seen.append((epoch, id(opt), opt.param_groups[0]["lr"], len(opt.state)))

    train_and_evaluate(net, x, y, lr=0.05, epochs=6, batch_size=4, on_epoch_start=record,
                       generator=torch.Generator().manual_seed(0), test_images=x, test_labels=y)
    lrs = [s[2] for s in seen]
    assert lrs[:3] == [0.05] * 3 and lrs[3:] == [0.05 * 0.1] * 3
    assert lrs[3] / lrs[2] == pytest.approx(0.1, rel=1e-15)
    ids = [s[1] for s in seen]
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] == ids[5] and ids[2] != ids[3]
    # momentum buffers: empty at the start and again right after the decay
    assert [s[3] for s in seen] == [0, 2, 2, 0, 2, 2]


def _hand_sgd(x, y, *, lr, mom, wd, bs, seed, reset):
    """Hand-written 2-epoch SGD: momentum 0.9, wd, lr x0.1 in epoch 1, buffers reset or not."""
    ref = _linear(seed=3)
    g = torch.Generator().manual_seed(seed)
    params = list(ref.parameters())
    bufs = [None] * len(params)
    for epoch in range(2):
        rate = lr if epoch == 0 else lr * 0.1
        if reset:
            bufs = [None] * len(params)  # the optimizer is re-created: momentum restarts
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(ref(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for j, (p, gr) in enumerate(zip(params, grads, strict=True)):
                    d = gr + wd * p
                    bufs[j] = d.clone() if bufs[j] is None else mom * bufs[j] + d
                    p -= rate * bufs[j]
    return params


def test_two_epoch_run_equals_hand_written_sgd():
    x, y = _data(n=10)
    kw = dict(lr=0.1, mom=0.9, wd=5e-4, bs=4, seed=5)
    net = _linear(seed=3)
    train_and_evaluate(net, x, y, lr=0.1, epochs=2, batch_size=4, momentum=0.9,
                       weight_decay=5e-4, generator=torch.Generator().manual_seed(5),
                       test_images=x, test_labels=y)
    for a, b in zip(net.parameters(), _hand_sgd(x, y, reset=True, **kw), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the momentum reset is visible: keeping the buffers gives other weights
    kept = _hand_sgd(x, y, reset=False, **kw)
    assert (net[1].weight - kept[0]).abs().max() > 1e-3


def test_soft_labels_use_soft_cross_entropy():
    x, _ = _data(n=6)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    net = _linear(seed=1)
    with torch.no_grad():
        out = net(x)
    hand = -(F.softmax(logits, 1) * F.log_softmax(out, 1)).sum(1).mean()
    res = train_and_evaluate(net, x, logits, lr=0.01, epochs=1, batch_size=6,
                             test_images=x, test_labels=torch.zeros(6, dtype=torch.long))
    assert res["train_loss"] == pytest.approx(float(hand), rel=1e-6)  # the only batch's loss
    assert res["train_loss"] != pytest.approx(float(F.cross_entropy(out, logits.argmax(1))))


def test_huge_one_hot_logits_match_hard_labels():
    x, y = _data(n=9)
    soft = 1000.0 * F.one_hot(y, 3).float()
    a, b = _linear(seed=4), _linear(seed=4)
    kw = dict(lr=0.05, epochs=3, batch_size=4, test_images=x, test_labels=y)
    ra = train_and_evaluate(a, x, y, generator=torch.Generator().manual_seed(0), **kw)
    rb = train_and_evaluate(b, x, soft, generator=torch.Generator().manual_seed(0), **kw)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert ra["accuracy"] == rb["accuracy"]
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)


class _Recorder(nn.Module):
    """A linear net that records what it sees in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if not self.training:
            self.seen.append(x.clone())
        return self.fc(x.flatten(1))


def test_zca_set_is_tested_on_zca_images_without_extra_transform():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 2, 2, generator=g)
    train_y = torch.arange(30) % 2
    test = torch.rand(8, 1, 2, 2, generator=g)
    test_y = torch.arange(8) % 2
    zca = ZCA(0.1).fit(train)
    space = {"dataset": "toy", "normalization": "zca", "zca_fingerprint": zca.fingerprint}
    syn = SyntheticSet.from_real(zca.transform(train), train_y, 2, 2,
                                 torch.Generator().manual_seed(0), meta={"input_space": space})
    test_z = zca.transform(test)
    syn.check_compatible(channels=1, image_size=2, num_classes=2, input_space=space)
    net = _Recorder()
    res = train_and_evaluate(net, syn.images, syn.labels, lr=0.1, epochs=2, batch_size=4,
                             test_images=test_z, test_labels=test_y, test_batch_size=5)
    # the test batches are exactly the ZCA images given: nothing else was applied
    assert torch.equal(torch.cat(net.seen), test_z)
    with torch.no_grad():
        expect = (net.fc(test_z.flatten(1)).argmax(1) == test_y).float().mean().item()
    assert res["accuracy"] == pytest.approx(expect, abs=1e-12)
    # a set whitened with another ZCA is refused
    other = ZCA(0.1).fit(torch.rand(30, 1, 2, 2, generator=g))
    assert other.fingerprint != zca.fingerprint
    with pytest.raises(ValueError, match="input space mismatch"):
        syn.check_compatible(channels=1, image_size=2, num_classes=2,
                             input_space={**space, "zca_fingerprint": other.fingerprint})
    with pytest.raises(ValueError, match="input space mismatch"):
        syn.check_compatible(channels=1, image_size=2, num_classes=2,
                             input_space={"normalization": "meanstd"})


def test_dsa_runs_on_every_batch_and_seeds_are_reproducible():
    x, y = _data(n=10)
    calls = []

    def augment(batch, generator=None):
        calls.append((batch.shape[0], generator))
        return batch

    gen = torch.Generator().manual_seed(0)
    train_and_evaluate(_linear(), x, y, lr=0.01, epochs=2, batch_size=4, augment=augment,
                       generator=gen, test_images=x, test_labels=y)
    assert [c[0] for c in calls] == [4, 4, 2, 4, 4, 2]
    assert all(c[1] is gen for c in calls)  # augment_generator defaults to generator
    assert run_seeds(3) == run_seeds(3) and run_seeds(3) != run_seeds(4)
    a = seeded_model("ConvNet", 1, 3, 8, seed=7, width=4, depth=1)
    state = torch.get_rng_state()
    b = seeded_model("ConvNet", 1, 3, 8, seed=7, width=4, depth=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert make_dsa("digits").flip is False and make_dsa("cifar10").flip is True
    assert make_dsa("cifar10", dsa=False) is None


def test_bad_inputs():
    x, y = _data()
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_and_evaluate(_linear(), x, y, lr=-0.01, epochs=1, test_images=x, test_labels=y)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        train_and_evaluate(_linear(), x, y[:9], lr=0.01, epochs=1, test_images=x,
                           test_labels=y)
