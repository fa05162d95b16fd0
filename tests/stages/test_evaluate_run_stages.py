"""`lightning-distill evaluate` and `run` (stages/evaluate.py, stages/pipeline.py) on digits with
tiny settings: the table's numbers, the baselines, the JSON output, and that `run`
resumes every stage from what is on disk."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.modules.evaluate import EvalModule, evaluate_synthetic
from lightning_distill.stages.evaluate import architecture_kwargs, evaluate_stage

SMALL = {"width": 8, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    dm = RealDataModule("digits")
    dm.setup("fit")
    return dm


def evaluate(*, seed: int = 0, epochs: int | None = None, batch_size: int | None = None,
             data: dict | None = None, **kw):
    """The ``evaluate`` stage on digits on the CPU: every run an :class:`EvalModule`
    (``seed``, and the protocol's ``epochs`` / ``batch_size`` where given); ``kw`` are
    :func:`evaluate_stage`'s (``synthetic``, ``models``, ``runs``, ``baselines``, ...)."""
    protocol = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size))
                if v is not None}
    model = EvalModule(seed=seed, **protocol)
    dm = RealDataModule(**{"name": "digits", **(data or {})})
    return evaluate_stage(model, dm, device=torch.device("cpu"), **kw)


def _random_set(dm, ipc: int, seed: int = 0) -> SyntheticSet:
    x, y = dm.train_set.tensors
    return SyntheticSet.from_real(
        x, y, ipc, 10, generator=torch.Generator().manual_seed(seed), lr=0.02,
        meta={"dataset": "digits", "input_space": dm.input_space,
              "model": {"name": "ConvNet", "channels": 1, "num_classes": 10,
                        "image_size": [8, 8], **SMALL}})


def test_evaluate_stage_rows_equal_direct_evaluation(digits, tmp_path):
    syn_path = tmp_path / "syn.pt"
    _random_set(digits, 2).save(syn_path)
    out = tmp_path / "results.json"
    rows = evaluate(synthetic=str(syn_path), models="ConvNet", runs=2, epochs=4, batch_size=16,
                    baselines=["random", "full"], full_epochs=1, full_batch_size=128, seed=5,
                    output=str(out))
    assert [r["kind"] for r in rows] == ["random", "distilled", "full"]
    assert rows[0]["ipc"] == 2 and rows[1]["ipc"] == 2 and rows[2]["ipc"] is None
    # the distilled row is exactly evaluate_synthetic with the experts' architecture
    test_x, test_y = digits.test_set.tensors
    direct = evaluate_synthetic(SyntheticSet.load(syn_path), test_x, test_y, runs=2, epochs=4,
                                batch_size=16, seed=5, device="cpu",
                                model_kwargs={"ConvNet": SMALL})["ConvNet"]
    got = rows[1]["results"]["ConvNet"]
    assert got["accs"] == direct["accs"]
    assert got["mean"] == pytest.approx(sum(direct["accs"]) / 2)
    # random baseline: one subset per network, so the two networks saw different images
    assert len(rows[0]["results"]["ConvNet"]["accs"]) == 2
    saved = json.loads(out.read_text())
    assert saved["rows"][1]["results"]["ConvNet"]["accs"] == direct["accs"]
    # per-class test accuracies of every row: one list of 10 per run, and their mean
    assert saved["rows"][1]["results"]["ConvNet"]["class_accs"] == direct["class_accs"]
    assert saved["rows"][1]["results"]["ConvNet"]["class_mean"] == direct["class_mean"]
    for row in saved["rows"]:
        res = row["results"]["ConvNet"]
        assert [len(c) for c in res["class_accs"]] == [10] * len(res["accs"])
        assert len(res["class_mean"]) == 10
    n_c = torch.bincount(test_y, minlength=10)
    for r, acc in enumerate(direct["accs"]):  # the classes' counts add up to the accuracy
        correct = sum(round(a * int(n)) for a, n in zip(direct["class_accs"][r], n_c,
                                                        strict=True))
        assert correct / test_y.numel() == acc


def test_random_baseline_draws_a_new_subset_per_network(digits, monkeypatch):
    seen = []

    def fake(real, *a, train_sets=None, **kw):
        seen.extend(x.clone() for x, _ in train_sets)  # one subset per network
        return {"ConvNet": {"accs": [0.5] * len(train_sets), "mean": 0.5, "std": 0.0}}

    monkeypatch.setattr("lightning_distill.stages.evaluate.evaluate_synthetic", fake)
    rows = evaluate(runs=3, baselines=["random"])
    assert [r["ipc"] for r in rows] == [1, 10]
    assert len(seen) == 6 and not torch.equal(seen[0], seen[1])
    assert rows[0]["results"]["ConvNet"]["accs"] == [0.5, 0.5, 0.5]


def test_evaluate_resumes_row_by_row(digits, tmp_path, monkeypatch):
    """results.json is written after every row; a rerun reuses the rows whose numbers
    cannot differ (same settings, data, device and set file) and trains the rest."""
    import lightning_distill.stages.evaluate as stage

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    _random_set(digits, 1, seed=0).save(a)
    _random_set(digits, 1, seed=1).save(b)
    out = tmp_path / "results.json"
    cfg = dict(synthetic=[str(a), str(b)], models="ConvNet", runs=2, epochs=3, batch_size=16,
               baselines=["random", "full"], full_epochs=1, full_batch_size=256, seed=3,
               output=str(out))
    real = stage.evaluate_synthetic
    trained = []

    def counting(syn, *args, **kw):
        trained.append(syn.images.shape[0])
        if fail_at is not None and len(trained) == fail_at:
            raise KeyboardInterrupt  # the run is stopped while training this row
        return real(syn, *args, **kw)

    monkeypatch.setattr(stage, "evaluate_synthetic", counting)
    fail_at = 3  # random, a, then stopped in b
    with pytest.raises(KeyboardInterrupt):
        evaluate(**cfg)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False
    assert [r["kind"] for r in partial["rows"]] == ["random", "distilled"]
    fail_at, trained[:] = None, []
    rows = evaluate(**cfg)
    assert trained == [10, len(digits.train_set)]  # only b and the full baseline
    assert [r["results"] for r in rows[:2]] == [r["results"] for r in partial["rows"]]
    assert json.loads(out.read_text())["complete"] is True
    # an uninterrupted run into another file gives the same rows, bit for bit
    fresh = evaluate(**{**cfg, "output": str(tmp_path / "fresh.json")})
    assert [r["results"] for r in fresh] == [r["results"] for r in rows]
    # rerun: nothing trained; a moved set file is still its row
    trained[:] = []
    moved = tmp_path / "moved.pt"
    moved.write_bytes(b.read_bytes())
    again = evaluate(**{**cfg, "synthetic": [str(a), str(moved)]})
    assert trained == [] and again[2]["label"].endswith("moved.pt)")
    assert [r["results"] for r in again] == [r["results"] for r in rows]
    # a changed set retrains its row only; other settings retrain everything
    _random_set(digits, 1, seed=2).save(b)
    evaluate(**cfg)
    assert trained == [10]
    trained[:] = []
    evaluate(**{**cfg, "epochs": 2})
    assert len(trained) == 4


def test_evaluate_refuses_a_mismatched_synthetic_set(digits, tmp_path):
    bad = SyntheticSet(images=torch.zeros(10, 3, 8, 8), labels=torch.arange(10), lr=0.01,
                       meta={"dataset": "digits"})
    bad.save(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="channels"):
        evaluate(synthetic=[str(tmp_path / "bad.pt")])
    other = SyntheticSet(images=torch.zeros(10, 1, 8, 8), labels=torch.arange(10), lr=0.01,
                         meta={"dataset": "mnist"})
    other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="--data.name mnist"):
        evaluate(synthetic=[str(tmp_path / "other.pt")])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate()
    with pytest.raises(ValueError, match="baselines"):
        evaluate(baselines=["best"])


def test_architecture_kwargs_come_from_the_set_and_can_be_overridden(digits):
    syn = _random_set(digits, 1)
    models = ["ConvNet", "AlexNet"]
    assert architecture_kwargs(models, {}, [syn]) == {"ConvNet": SMALL}
    assert architecture_kwargs(models, {"ConvNet": {"width": 16}}, [syn]) == {
        "ConvNet": {"width": 16, "depth": 2}}


def test_cli_accepts_a_single_synthetic_file_and_model():
    pytest.importorskip("jsonargparse")
    from lightning_distill.cli import parse_lightning_config

    cfg = parse_lightning_config(["evaluate", "--synthetic", "a.pt", "--models", "AlexNet",
                                  "--runs", "3"])
    assert (cfg.synthetic, cfg.models, cfg.runs) == ("a.pt", "AlexNet", 3)


def _run_recipe(work) -> dict:
    """A tiny run recipe: 2 GSAM experts x 3 epochs, one ipc-1 set of 3 iterations, one
    evaluation network of 3 epochs against the random baseline."""
    return {
        "workdir": str(work), "seed": 1,
        "data": {"name": "digits", "batch_size": 64},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
        "experts": {"num_experts": 2,
                    "model": {"model": "ConvNet", "model_kwargs": dict(SMALL), "lr": 0.05},
                    "trainer": {"max_epochs": 3, "callbacks": [
                        {"class_path": "lightning_distill.callbacks.GSAM"}]}},
        "distill": [{"name": "ipc1",
                     "model": {"ipc": 1, "iterations": 3, "syn_steps": 3, "lr_img": 10.0,
                               "lr_lr": 1e-4, "lr_teacher": 0.05, "max_start_epoch": 1},
                     "trainer": {"callbacks": [
                         {"class_path": "lightning_distill.callbacks.MatchingWindow",
                          "init_args": {"min_start_epoch": 0, "max_start_epoch": 1}},
                         {"class_path": "lightning_distill.callbacks.IterationCheckpoint",
                          "init_args": {"every_n": 10}}]}}],
        "evaluate": {"runs": 1, "baselines": ["random"], "model": {"protocol": {"epochs": 3}}},
    }


def test_run_chains_the_stages_and_resumes(tmp_path):
    """`lightning-distill run`: its experts are those of the experts stage with the
    merged settings, bit for bit, its rows those of the evaluate stage on its set; a
    rerun trains nothing again."""
    from lightning_distill import cli
    from lightning_distill.callbacks import GSAM
    from lightning_distill.modules.expert import ExpertTrajectoryModule
    from lightning_distill.stages.experts import train_experts

    work = tmp_path / "work"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_recipe(work)), encoding="utf-8")
    assert cli.main(["run", "--config", str(path)]) == 0
    assert sorted(p.name for p in (work / "experts").glob("expert_*.pt")) == [
        "expert_00000.pt", "expert_00001.pt"]
    ref = train_experts(
        ExpertTrajectoryModule(model="ConvNet", model_kwargs=dict(SMALL), lr=0.05),
        RealDataModule("digits", batch_size=64),
        dict(accelerator="cpu", enable_progress_bar=False, max_epochs=3, callbacks=[GSAM()]),
        store=str(tmp_path / "ref"), num_experts=2, seed=1, log_dir=str(tmp_path / "logs"))
    for i in (0, 1):
        name = f"expert_{i:05d}.pt"
        assert torch.equal(torch.load(work / "experts" / name, weights_only=True),
                           torch.load(ref.expert_path(i), weights_only=True))
    syn = SyntheticSet.load(work / "ipc1" / "synthetic.pt")
    assert syn.meta["iteration"] == 3 and syn.ipc == 1
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["random", "distilled"] and rows[1]["ipc"] == 1
    direct = evaluate(synthetic=[str(work / "ipc1" / "synthetic.pt")], runs=1, epochs=3,
                      baselines=["random"], seed=1, data={"batch_size": 64})
    assert [r["results"]["ConvNet"]["accs"] for r in rows] == [
        r["results"]["ConvNet"]["accs"] for r in direct]
    # every stage's merged config is on disk and reruns that stage alone
    assert sorted(p.name for p in (work / "configs").iterdir()) == [
        "distill_ipc1.yaml", "evaluate.yaml", "experts.yaml"]
    # second run: nothing is trained again, the evaluation gives the same numbers
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")}
    assert cli.main(["run", "--config", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")} == before
    again = json.loads((work / "results.json").read_text())["rows"]
    assert again[1]["results"] == rows[1]["results"]


def test_run_evaluates_on_global_rank_zero_only(monkeypatch, tmp_path):
    """Under DDP every rank runs the pipeline; the evaluation (plain loops) runs once, on
    the validation-selected set where the distillation has a PeriodicEvaluation."""
    from pytorch_lightning.utilities import rank_zero_only

    from lightning_distill.stages.pipeline import run_pipeline

    recipe = {"workdir": str(tmp_path), "distill": [
        {"name": "a", "trainer": {"callbacks": [
            {"class_path": "lightning_distill.callbacks.PeriodicEvaluation"}]}},
        {"name": "b"}]}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "best.pt").write_bytes(b"")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    argv = ["run", "--config", str(path)]
    calls = []

    def launch(argv):
        calls.append((argv[0], list(argv)))

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run_pipeline(argv, launch=launch, check=lambda argv: None)
    assert [c[0] for c in calls] == ["experts", "distill", "distill"]
    calls.clear()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    run_pipeline(argv, launch=launch, check=lambda argv: None)
    assert [c[0] for c in calls] == ["experts", "distill", "distill", "evaluate"]
    evaluate_argv = calls[-1][1]
    sets = yaml.safe_load(evaluate_argv[evaluate_argv.index("--synthetic") + 1])
    assert sets == [str(tmp_path / "a" / "best.pt"), str(tmp_path / "b" / "synthetic.pt")]
