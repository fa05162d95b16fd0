"""EL2N scores of the training split (lightning_distill/difficulty.py): seeded per network,
cached with the data's identity, reused without training, refused or recomputed when the
data or the settings change."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_distill.difficulty as difficulty
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.difficulty import (
    DifficultyScoresError,
    compute_el2n,
    data_identity,
    el2n_settings,
    load_or_compute_el2n,
)
from lightning_distill.functional import el2n_scores
from lightning_distill.functional.evaluation import seeded_model, train_and_evaluate
from lightning_distill.seeding import derive_seed

MODEL = {"name": "ConvNet", "channels": 1, "num_classes": 10, "image_size": [8, 8],
         "width": 4, "depth": 2}


def _dm(**kw) -> RealDataModule:
    opts = dict(batch_size=256, val_fraction=0.1, split_seed=0)
    opts.update(kw)
    dm = RealDataModule("digits", **opts)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm() -> RealDataModule:
    return _dm()


def _settings(**kw):
    opts = dict(num_models=2, epochs=1, lr=0.05, batch_size=128, seed=0)
    opts.update(kw)
    return el2n_settings(MODEL, **opts)


@pytest.fixture
def count_training(monkeypatch):
    calls = []

    def counting(*args, **kw):
        calls.append(1)
        return train_and_evaluate(*args, **kw)

    monkeypatch.setattr(difficulty, "train_and_evaluate", counting)
    return calls


def test_scores_are_the_mean_el2n_of_networks_seeded_by_seed_and_index(dm, count_training):
    s = _settings()
    out = compute_el2n(dm, s)
    n = len(dm.train_set)
    assert count_training == [1, 1] and out.computed
    assert out.scores.shape == (n,) and out.per_model.shape == (2, n)
    torch.testing.assert_close(out.scores, out.per_model.mean(0))
    assert float(out.scores.min()) >= 0 and float(out.scores.max()) <= math.sqrt(2)
    assert not torch.equal(out.per_model[0], out.per_model[1])  # two different networks
    # network 0 again by hand: seeded_model(derive_seed(0, 0)), order derive_seed(0, 0, 1),
    # then EL2N of the un-augmented training split in eval mode
    x, y = dm.train_set.tensors
    net = seeded_model("ConvNet", 1, 10, (8, 8), seed=derive_seed(0, 0), width=4, depth=2)
    train_and_evaluate(net, x, y, lr=0.05, epochs=1, batch_size=128, momentum=0.9,
                       weight_decay=5e-4, lr_decay_epoch=0,
                       generator=torch.Generator().manual_seed(derive_seed(0, 0, 1)),
                       test_images=x[:10], test_labels=y[:10])
    net.eval()
    with torch.no_grad():
        by_hand = el2n_scores(net(x), y)
    torch.testing.assert_close(out.per_model[0], by_hand)
    # a network depends on (seed, k) alone: the first of three equals the first of two
    three = compute_el2n(dm, _settings(num_models=3))
    assert torch.equal(three.per_model[0], out.per_model[0])
    assert len(out.model_accuracy) == 2 and all(0 <= a <= 1 for a in out.model_accuracy)


def test_cache_is_reused_without_training(dm, tmp_path, count_training):
    path = tmp_path / "difficulty_el2n.pt"
    first = load_or_compute_el2n(path, dm, _settings())
    assert count_training == [1, 1] and first.computed and path.is_file()
    second = load_or_compute_el2n(path, dm, _settings())
    assert count_training == [1, 1]  # loaded: nothing trained
    assert not second.computed and second.path == path
    assert torch.equal(second.scores, first.scores) and second.digest == first.digest
    saved = torch.load(path, weights_only=True)
    assert saved["identity"] == data_identity(dm) and saved["settings"] == _settings()
    assert saved["identity"]["train_size"] == len(dm.train_set)
    assert sum(saved["identity"]["class_sizes"]) == len(dm.train_set)
    # a fresh datamodule of the same data has the same identity
    assert load_or_compute_el2n(path, _dm(), _settings()).digest == first.digest
    assert count_training == [1, 1]


def test_mismatched_cache_is_refused_or_recomputed(dm, tmp_path, count_training):
    path = tmp_path / "scores.pt"
    load_or_compute_el2n(path, dm, _settings())
    assert len(count_training) == 2
    with pytest.raises(DifficultyScoresError, match=r"settings\.num_models: file 2, run 3"):
        load_or_compute_el2n(path, dm, _settings(num_models=3))
    other_split = _dm(split_seed=1)  # another validation split: other training rows
    with pytest.raises(DifficultyScoresError, match=r"identity\.fingerprint"):
        load_or_compute_el2n(path, other_split, _settings())
    zca = _dm(zca=True)
    with pytest.raises(DifficultyScoresError, match=r"identity\.input_space"):
        load_or_compute_el2n(path, zca, _settings())
    assert len(count_training) == 2  # refusals train nothing
    messages = []
    again = load_or_compute_el2n(path, dm, _settings(num_models=1), on_mismatch="recompute",
                                 log=messages.append)
    assert len(count_training) == 3 and again.computed
    assert any("recomputing" in m for m in messages)
    assert torch.load(path, weights_only=True)["settings"]["num_models"] == 1
    with pytest.raises(ValueError, match="on_mismatch"):
        load_or_compute_el2n(path, dm, _settings(), on_mismatch="ignore")


def test_corrupt_or_foreign_file_is_refused(dm, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DifficultyScoresError, match="corrupt"):
        load_or_compute_el2n(bad, dm, _settings())
    torch.save({"scores": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(DifficultyScoresError, match="not a lightning_distill"):
        load_or_compute_el2n(tmp_path / "foreign.pt", dm, _settings())
    with pytest.raises(ValueError, match=">= 1"):
        el2n_settings(MODEL, num_models=0)


def test_a_file_published_meanwhile_by_another_process_wins(dm, tmp_path, monkeypatch):
    path = tmp_path / "scores.pt"
    real_compute = difficulty.compute_el2n

    def compute_while_another_shard_publishes(dm_, settings, **kw):
        ours = real_compute(dm_, settings, **kw)
        theirs = {"format": difficulty.FORMAT, "format_version": difficulty.FORMAT_VERSION,
                  "scores": torch.full_like(ours.scores, 0.5), "per_model": ours.per_model,
                  "identity": data_identity(dm_), "settings": settings}
        torch.save(theirs, path)
        return ours

    monkeypatch.setattr(difficulty, "compute_el2n", compute_while_another_shard_publishes)
    got = load_or_compute_el2n(path, dm, _settings(num_models=1))
    assert torch.equal(got.scores, torch.full((len(dm.train_set),), 0.5))
    assert not got.computed
