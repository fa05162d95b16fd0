"""Evaluation and EL2N scoring on a streamed split (issue 29): every pass reads the split
in batches (a random subset only its rows, the test and validation passes slices, the
full-data baseline and the EL2N networks each step's rows) and gives the numbers of the
same split held in memory, bit for bit; the data identities hash to the held digests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_distill.artifacts import TensorChunks, sha256
from lightning_distill.callbacks.evaluation import PeriodicEvaluation
from lightning_distill.data import splits
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.splits import HeldSplit, SplitImages, StreamedSplit, images_hash_part
from lightning_distill.data.synthetic_datamodule import SyntheticDataModule
from lightning_distill.difficulty import compute_el2n, data_identity, el2n_settings
from lightning_distill.errors import InputError
from lightning_distill.modules.evaluate import EvalModule, evaluate_synthetic
from lightning_distill.stages.evaluate import evaluate_stage
from tests.helpers import random_digits_set

SMALL = {"width": 8, "depth": 2}


def _digits(hold: bool, **kw) -> RealDataModule:
    dm = RealDataModule("digits", hold=hold, **kw)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def pair():
    held, streamed = _digits(True), _digits(False)
    assert isinstance(held.train_set, HeldSplit) and isinstance(streamed.train_set, StreamedSplit)
    assert isinstance(streamed.test_set, StreamedSplit)
    return held, streamed


def test_chunked_hashes_equal_the_whole_tensors(monkeypatch):
    x = torch.randn(10, 2, 3)
    whole = sha256(x, b"tail")
    chunked = TensorChunks(torch.float32, (10, 2, 3),
                           lambda: (x[i : i + 3] for i in range(0, 10, 3)))
    assert sha256(chunked, b"tail") == whole
    with pytest.raises(InputError, match="rows"):
        sha256(TensorChunks(torch.float32, (11, 2, 3), lambda: iter([x])))
    with pytest.raises(InputError, match="chunk"):
        sha256(TensorChunks(torch.float64, (10, 2, 3), lambda: iter([x])))
    # a streamed split hashes as the held one, whatever the chunk (several chunks here)
    monkeypatch.setattr(splits, "HASH_CHUNK_ROWS", 100)
    for zca in (False, True):
        held, streamed = _digits(True, zca=zca), _digits(False, zca=zca)
        for name in ("train_set", "val_set", "test_set"):
            part = images_hash_part(getattr(streamed, name))
            assert isinstance(part, TensorChunks)
            assert sha256(part) == sha256(getattr(held, name).tensors[0])
        # EL2N's fingerprint gathers the raw codes in chunks: today's digest
        real, idx = held.real, held.train_idx
        old = sha256(idx, held.train_set.tensors[1], real.train_data.index_select(0, idx),
                     length=16)
        assert data_identity(held)["fingerprint"] == old == data_identity(streamed)["fingerprint"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_evaluate_stage_equals_the_held_split_and_resumes_across(pair, tmp_path, monkeypatch):
    """Random baseline, a set, the full-data baseline and DD-Ranking's scores: the same
    rows and identity on a streamed split as on the held one; the held run's
    results.json is reused as it is by the streamed run."""
    import lightning_distill.stages.evaluate as stage

    held, streamed = pair
    syn = random_digits_set(ipc=1, seed=4, lr=0.03)
    path = syn.save(tmp_path / "syn.pt", grid=False)
    cfg = dict(synthetic=[str(path)], models="ConvNet", runs=2, baselines=["random", "full"],
               full_epochs=1, full_batch_size=128,
               model_kwargs={"ConvNet": SMALL}, scores=True)
    results = []
    for name, dm in (("held", held), ("streamed", streamed)):
        out = tmp_path / f"{name}.json"
        rows = evaluate_stage(EvalModule(seed=3, epochs=2, batch_size=8), dm,
                              device=torch.device("cpu"), output=str(out), **cfg)
        results.append((rows, json.loads(out.read_text())))
    (rows_h, file_h), (rows_s, file_s) = results
    assert [r["kind"] for r in rows_s] == ["random", "distilled", "full"]
    assert rows_s == rows_h  # accuracies, per-class accuracies, scores: bit for bit
    assert rows_s[1]["scores"]["ConvNet"]["hlr"] is not None
    assert file_s["identity"] == file_h["identity"]  # the data digest too
    # the held run's file resumes the streamed run: nothing trains
    monkeypatch.setattr(stage, "evaluate_synthetic", lambda *a, **k: pytest.fail("trained"))
    again = evaluate_stage(EvalModule(seed=3, epochs=2, batch_size=8), streamed,
                           device=torch.device("cpu"), output=str(tmp_path / "held.json"), **cfg)
    assert again == rows_h


def test_random_subsets_read_only_their_rows():
    dm = _digits(False)
    kw = dict(models=["ConvNet"], model_kwargs={"ConvNet": SMALL}, epochs=1, batch_size=8,
              device="cpu")
    from lightning_distill.stages.scores import random_subsets

    before = dm.train_set.rows_read
    subsets = random_subsets(dm, seed=1, ipc=2, runs=3, lr=0.01)
    assert dm.train_set.rows_read - before == 3 * 2 * 10
    test_x = splits.images_view(dm.test_set)
    assert isinstance(test_x, SplitImages)
    before = dm.test_set.rows_read
    res = evaluate_synthetic(subsets[0], test_x, dm.test_set.labels, runs=3, seed=0,
                             train_sets=[(s.images, s.labels) for s in subsets],
                             test_batch_size=100, **kw)
    # the 3 runs train as one group: one test pass reads the test split once, by slices
    assert dm.test_set.rows_read - before == len(dm.test_set)
    held = _digits(True)
    ref = evaluate_synthetic(subsets[0], *held.test_set.tensors, runs=3, seed=0,
                             train_sets=[(s.images, s.labels) for s in subsets],
                             test_batch_size=100, **kw)
    assert res == ref


@pytest.mark.parametrize("group_size", [1, 2], ids=["plain", "grouped"])
def test_full_data_training_gathers_each_batch(pair, group_size):
    """``train_data`` as a row source: the plain loop and the grouped one read each
    step's rows and train exactly as on the tensor."""
    held, streamed = pair
    view = splits.images_view(streamed.train_set)
    carrier = random_digits_set(ipc=1)
    kw = dict(models=["ConvNet"], model_kwargs={"ConvNet": SMALL}, runs=2, seed=1, epochs=1,
              batch_size=256, lr=0.01, group_size=group_size, device="cpu")
    before = streamed.train_set.rows_read
    got = evaluate_synthetic(carrier, *held.test_set.tensors,
                             train_data=(view, streamed.train_set.labels), **kw)
    assert streamed.train_set.rows_read - before == 2 * len(streamed.train_set)  # 2 runs, 1 epoch
    want = evaluate_synthetic(carrier, *held.test_set.tensors,
                              train_data=held.train_set.tensors, **kw)
    assert got == want
    with pytest.raises(InputError, match="not both"):
        evaluate_synthetic(carrier, *held.test_set.tensors, train_data=held.train_set.tensors,
                           train_sets=[held.train_set.tensors] * 2, **kw)


def test_periodic_evaluation_reads_a_streamed_validation_split(pair):
    syn = random_digits_set(ipc=2, seed=1)
    accs = []
    for dm in pair:
        cb = PeriodicEvaluation(every_n_steps=1, runs=2, epochs=2, batch_size=8,
                                model_kwargs=SMALL, seed=2, eval_batch_size=50)
        cb.setup(SimpleNamespace(precision="32-true", datamodule=dm), SimpleNamespace(), "fit")
        accs.append(cb.evaluate(syn))
    assert isinstance(pair[1].val_set, StreamedSplit)
    assert accs[0] == accs[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")
def test_eval_module_validates_and_tests_on_a_streamed_split(tmp_path):
    """trainer.fit / trainer.test with a SyntheticDataModule over a streamed real data
    module: its uint8 batches become input-space images (the real module's transfer
    hook), the accuracies those of the held module."""
    syn = random_digits_set(ipc=2, seed=3)
    out = []
    for hold in (True, False):
        real = RealDataModule("digits", hold=hold, batch_size=100)
        dm = SyntheticDataModule(syn, real=real)
        module = EvalModule(model="ConvNet", model_kwargs=SMALL, seed=[1, 2], epochs=2,
                            batch_size=8)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
        assert isinstance(real.test_set, HeldSplit if hold else StreamedSplit)
        out.append((module.val_accuracies, module.test_accuracies,
                    module.test_class_accuracies))
    assert out[0] == out[1] and out[0][1] is not None


def test_el2n_scores_on_a_streamed_split_equal_the_held_ones(pair):
    held, streamed = pair
    settings = el2n_settings({"name": "ConvNet", **SMALL}, num_models=2, epochs=1,
                             batch_size=128)
    a = compute_el2n(held, settings)
    before = streamed.train_set.rows_read
    b = compute_el2n(streamed, settings)
    assert streamed.train_set.rows_read > before
    assert torch.equal(a.scores, b.scores) and torch.equal(a.per_model, b.per_model)
    assert a.model_accuracy == b.model_accuracy and a.identity == b.identity


def test_importing_a_reference_set_measures_a_streamed_split(pair):
    from lightning_distill.data.reference_sets import space_candidates

    held, streamed = pair
    a, b = space_candidates(held), space_candidates(streamed)
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")
def test_the_trainer_path_tests_on_a_streamed_split(pair):
    held, streamed = pair
    syn = random_digits_set(ipc=1, seed=2)
    kw = dict(models=["ConvNet"], model_kwargs={"ConvNet": SMALL}, runs=2, seed=0, epochs=1,
              batch_size=8, device="cpu", use_trainer=True, test_batch_size=200)
    got = evaluate_synthetic(syn, splits.images_view(streamed.test_set),
                             streamed.test_set.labels, **kw)
    assert got == evaluate_synthetic(syn, *held.test_set.tensors, **kw)
