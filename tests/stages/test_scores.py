"""DD-Ranking's scores in `lightning-distill evaluate` (issue 30): every distilled row of
results.json and of the printed table carries HLR, IOR, LRS and ARS computed from the
runs it pairs (the full-data row, the random rows, the extra runs), and the extra runs
are the trainings they claim to be."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_distill import cli
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import EvalProtocol
from lightning_distill.functional.ranking import exp_score
from lightning_distill.modules.evaluate import evaluate_synthetic
from lightning_distill.stages.scores import random_subsets, soft_labeller
from tests.helpers import build_digits_store, random_digits_set

SMALL = {"width": 8, "depth": 2}
EPOCHS, RUNS = 8, 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A hard-label ipc 1 set and a soft-label ipc 2 set (labels from a digits store's
    experts, ``source_store`` set), evaluated with scores."""
    d = tmp_path_factory.mktemp("scores")
    store = build_digits_store(d / "experts")
    hard = random_digits_set(ipc=1, seed=1, lr=0.03).save(d / "hard.pt", grid=False)
    soft = random_digits_set(ipc=2, seed=2, lr=0.02)
    soft.labels = soft_labeller(str(store))(soft.images, soft.labels)
    soft.meta["source_store"] = str(store)
    soft = soft.save(d / "soft.pt", grid=False)
    out = d / "results.json"
    argv = ["evaluate", "--config", "digits/evaluate", f"--synthetic=[{hard}, {soft}]",
            "--runs", str(RUNS), "--full_epochs", "2", "--model.protocol.epochs", str(EPOCHS),
            "--model.protocol.group_size", "2", "--model_kwargs",
            json.dumps({"ConvNet": SMALL}), "--trainer.accelerator", "cpu", "--output",
            str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text()), hard, soft, store


def _rows(results):
    rows = {r["kind"] + str(r["ipc"]): r for r in results["rows"]}
    return rows, {k: r["results"]["ConvNet"]["accs"] for k, r in rows.items()}


def test_a_hard_label_sets_scores_pair_its_runs_with_the_baselines(evaluated):
    results, *_ = evaluated
    rows, accs = _rows(results)
    s = rows["distilled1"]["scores"]["ConvNet"]
    syn, full, rand = accs["distilled1"], accs["fullNone"], accs["random1"]
    # hard labels: the images with hard labels are the row itself; random: the baseline row
    assert s["accs"]["syn_hard"] == syn and s["accs"]["random"] == rand
    assert s["hlr"]["values"] == pytest.approx([f - a for f, a in zip(full, syn, strict=True)])
    assert s["ior"]["values"] == pytest.approx([a - r for a, r in zip(syn, rand, strict=True)])
    assert s["lrs"]["values"] == pytest.approx(
        [exp_score(0.5 * i - 0.5 * h) for h, i in zip(s["hlr"]["values"], s["ior"]["values"],
                                                       strict=True)])
    other = [a - r for a, r in zip(s["accs"]["syn_other_aug"], s["accs"]["random_other_aug"],
                                   strict=True)]
    assert s["ars"]["values"] == pytest.approx(
        [exp_score(0.5 * i + 0.5 * o) for i, o in zip(s["ior"]["values"], other, strict=True)])
    assert s["lrs"]["mean"] == pytest.approx(sum(s["lrs"]["values"]) / RUNS)


def test_the_extra_runs_are_the_trainings_they_name(evaluated):
    results, hard, soft, store = evaluated
    rows, accs = _rows(results)
    dm = RealDataModule("digits", batch_size=32)
    dm.setup("fit")
    x, y = dm.test_set.tensors
    protocol = EvalProtocol(**results["config"]["protocol"])
    common = dict(models=["ConvNet"], runs=RUNS, seed=0, model_kwargs={"ConvNet": SMALL},
                  protocol=protocol)
    syn = SyntheticSet.load(soft)
    s = rows["distilled2"]["scores"]["ConvNet"]
    # the soft set's images with class-major hard labels, at the set's lr
    hard_syn = SyntheticSet(syn.images, syn.hard_labels, syn.lr, syn.meta)
    assert s["accs"]["syn_hard"] == evaluate_synthetic(hard_syn, x, y, **common)["ConvNet"][
        "accs"]
    # the set without DSA
    assert s["accs"]["syn_other_aug"] == evaluate_synthetic(syn, x, y, dsa=False, **common)[
        "ConvNet"]["accs"]
    # random subsets of the baseline's draw, labelled by the same experts, at random_lr
    label = soft_labeller(str(store))
    subsets = [SyntheticSet(t.images, label(t.images, t.labels), t.lr, t.meta)
               for t in random_subsets(dm, 0, 2, RUNS, 0.01)]
    assert subsets[0].soft
    want = evaluate_synthetic(subsets[0], x, y, lr=0.01,
                              train_sets=[(t.images, t.labels) for t in subsets], **common)
    assert s["accs"]["random"] == want["ConvNet"]["accs"]
    assert s["ior"]["values"] == pytest.approx(
        [a - r for a, r in zip(accs["distilled2"], s["accs"]["random"], strict=True)])


def test_the_printed_table_and_the_resumed_rows_keep_the_scores(evaluated, tmp_path, capsys):
    results, hard, soft, _ = evaluated
    out = tmp_path / "r.json"
    out.write_text(json.dumps(results))
    base = ["evaluate", "--config", "digits/evaluate", f"--synthetic=[{hard}, {soft}]",
            "--runs", str(RUNS), "--full_epochs", "2", "--model.protocol.epochs", str(EPOCHS),
            "--model.protocol.group_size", "2", "--model_kwargs",
            json.dumps({"ConvNet": SMALL}), "--trainer.accelerator", "cpu", "--output",
            str(out)]
    capsys.readouterr()
    assert cli.main(base) == 0  # every row and its scores from the file
    printed = capsys.readouterr().out
    assert "DD-Ranking scores" in printed and "LRS" in printed and "ARS" in printed
    again = json.loads(out.read_text())
    assert [r.get("scores") for r in again["rows"]] == [r.get("scores") for r in results["rows"]]
    assert cli.main([*base, "--scores", "false", "--output", str(tmp_path / "n.json")]) == 0
    plain = json.loads((tmp_path / "n.json").read_text())
    assert not any("scores" in r for r in plain["rows"])


def test_a_soft_set_without_its_experts_gets_hlr_and_a_note(tmp_path):
    syn = random_digits_set(ipc=1, seed=3)
    syn.labels = torch.nn.functional.one_hot(syn.labels, 10).float() * 4
    path = syn.save(tmp_path / "soft.pt", grid=False)
    out = tmp_path / "r.json"
    assert cli.main(["evaluate", "--config", "digits/evaluate", f"--synthetic=[{path}]",
                     "--runs", "1", "--full_epochs", "1", "--model.protocol.epochs", "2",
                     "--model_kwargs", json.dumps({"ConvNet": SMALL}),
                     "--trainer.accelerator", "cpu", "--output", str(out)]) == 0
    row = next(r for r in json.loads(out.read_text())["rows"] if r["kind"] == "distilled")
    assert row["scores"]["ConvNet"]["hlr"] is not None
    assert row["scores"]["ConvNet"]["lrs"] is None and "source_store" in row["scores"]["note"]
