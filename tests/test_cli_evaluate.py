"""`lightning-distill evaluate` as a LightningCLI: the same rows as the stage's builder
(evaluate_stage) called directly (bit for bit on CPU), results.json, and the older
format refused."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_distill import cli
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.errors import InputError
from lightning_distill.modules.evaluate import EvalModule
from lightning_distill.stages.evaluate import EVALUATE_OPTIONS, evaluate_stage
from tests.helpers import random_digits_set

SMALL = {"width": 8, "depth": 2}


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def syn_path(tmp_path_factory):
    return random_digits_set().save(tmp_path_factory.mktemp("syn") / "ipc2.pt", grid=False)


def test_cli_evaluate_gives_the_rows_of_the_stage_path(syn_path, tmp_path):
    out = tmp_path / "cli.json"
    argv = ["evaluate", "--config", "digits/evaluate", f"--synthetic=[{syn_path}]",
            "--runs", "2", "--baselines", "[random, full]", "--full_epochs", "2",
            "--model.protocol.epochs", "6", "--model.protocol.group_size", "2",
            "--model_kwargs", json.dumps({"ConvNet": SMALL}), "--trainer.accelerator",
            "cpu", "--output", str(out)]
    assert cli.main(argv) == 0
    stage = evaluate_stage(
        EvalModule(epochs=6, group_size=2), RealDataModule("digits", batch_size=32),
        device=torch.device("cpu"), synthetic=[str(syn_path)], models=["ConvNet"],
        model_kwargs={"ConvNet": SMALL}, runs=2, baselines=["random", "full"], full_epochs=2,
        full_batch_size=64, output=str(tmp_path / "stage.json"))
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == [r["label"] for r in stage]
    for ours, theirs in zip(rows, stage, strict=True):
        assert ours["results"]["ConvNet"]["accs"] == theirs["results"]["ConvNet"]["accs"]
        assert ours["results"]["ConvNet"]["class_mean"] == theirs["results"]["ConvNet"][
            "class_mean"]
    config = json.loads(out.read_text())["config"]
    assert config["protocol"]["epochs"] == 6 and config["runs"] == 2


def test_the_stage_options_are_the_trainer_methods_arguments():
    """``DistillTrainer.evaluate`` (what the CLI parses and documents) and
    ``evaluate_stage`` (which runs it) take the same options with the same defaults."""
    import inspect

    params = inspect.signature(cli.DistillTrainer.evaluate).parameters
    method = {n: p.default for n, p in params.items() if n not in ("self", "model", "datamodule")}
    assert method == EVALUATE_OPTIONS


def test_evaluate_stage_refuses_an_unknown_option():
    with pytest.raises(InputError, match=r"unknown option\(s\) \['run'\]"):
        evaluate_stage(EvalModule(), None, device=torch.device("cpu"), run=3)


def test_an_older_format_evaluate_recipe_is_one_error_line_naming_the_file(tmp_path, capsys):
    """The format before LightningCLI (``epochs``, ``group_size``, ``device`` at the top
    level): one line naming the file and the key."""
    bad = tmp_path / "old.yaml"
    bad.write_text("data:\n  name: digits\nepochs: 300\ngroup_size: 4\nseed: 2\n"
                   "models: [ConvNet, AlexNet]\ndevice: cuda:1\n", encoding="utf-8")
    assert cli.main(["evaluate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lightning-distill evaluate: error: {bad}: ")
    assert any(f"'{key}'" in err for key in ("epochs", "group_size", "seed", "device"))


class MyEval(EvalModule):
    pass


def test_a_subclass_of_evalmodule_is_refused_with_where_it_runs(syn_path, capsys):
    """evaluate trains its runs with the protocol, not the module's steps: a subclass
    would be silently ignored, so it is refused, naming fit / test."""
    argv = ["evaluate", "--config", "digits/evaluate", f"--synthetic=[{syn_path}]",
            "--model.class_path", f"{__name__}.MyEval", "--trainer.accelerator", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "MyEval is a subclass of EvalModule" in err and "lightning-distill fit" in err


def test_results_json_is_checked_on_reading(tmp_path):
    """load_rows (and the resume of an evaluation) reads a results.json only if it is
    one: the header's format and version, rows with label / kind / results; a file from
    before the header is read; anything else is a one-line DataFormatError naming it."""
    from lightning_distill.errors import DataFormatError
    from lightning_distill.stages.evaluate import RESULTS_FORMAT, load_rows

    row = {"label": "random real, ipc 1", "kind": "random", "ipc": 1,
           "results": {"ConvNet": {"mean": 0.5, "std": 0.1, "accs": [0.4, 0.6]}}}
    path = tmp_path / "results.json"
    good = {"format": RESULTS_FORMAT, "format_version": 1, "rows": [row]}
    for obj in (good, {"rows": [row]}):  # with the header, and from before it
        path.write_text(json.dumps(obj))
        assert load_rows(path) == [row]
    bad = [({**good, "format": "lightning_distill.SyntheticSet"}, "not a lightning_distill"),
           ({**good, "format_version": 99}, "newer"),
           ({**good, "rows": [{"label": "x"}]}, "'rows' must be a list"),
           ({**good, "rows": "none"}, "'rows' must be a list")]
    for obj, words in bad:
        path.write_text(json.dumps(obj))
        with pytest.raises(DataFormatError, match=words) as caught:
            load_rows(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match="not JSON"):
        load_rows(path)


def _row(path, ipc, mean, std):
    return {"label": f"distilled, ipc {ipc} ({path})", "kind": "distilled", "ipc": ipc,
            "path": path, "results": {"ConvNet": {"mean": mean, "std": std}}}


def test_seed_groups_average_each_configuration_over_its_seeds():
    from lightning_distill.stages.evaluate import seed_groups

    rows = [{"label": "random real, ipc 1", "kind": "random", "ipc": 1,
             "results": {"ConvNet": {"mean": 0.5, "std": 0.03}}},
            _row("w/ipc1_s0/best.pt", 1, 0.70, 0.02),
            _row("w/ipc1_s1/best.pt", 1, 0.74, 0.01),
            _row("w/ipc1_s2/best.pt", 1, 0.66, 0.03),
            _row("w/ipc1_s1/synthetic.pt", 1, 0.60, 0.01),  # another file: its own group
            _row("v/ipc1_s0/best.pt", 1, 0.10, 0.01),       # another run directory
            _row("w/ipc10/best.pt", 10, 0.85, 0.01),        # not a seed directory
            _row("w/ipc10_s0/best.pt", 10, 0.86, 0.01)]     # one seed: no group
    groups = seed_groups(rows, ["ConvNet"])
    assert len(groups) == 1
    g = groups[0]
    assert g["name"] == "ipc1" and g["ipc"] == 1 and g["seeds"] == [0, 1, 2]
    assert g["paths"] == ["w/ipc1_s0/best.pt", "w/ipc1_s1/best.pt", "w/ipc1_s2/best.pt"]
    r = g["results"]["ConvNet"]
    assert r["seed_means"] == [0.70, 0.74, 0.66]
    assert r["mean"] == pytest.approx(0.70)
    # population std of 0.70, 0.74, 0.66: sqrt((0 + 0.04^2 + 0.04^2) / 3)
    assert r["std"] == pytest.approx((2 * 0.04 ** 2 / 3) ** 0.5)
    assert r["std_within"] == pytest.approx(0.02)


def test_evaluate_writes_the_seed_groups_of_a_runs_seed_directories(tmp_path):
    paths = []
    for seed in (0, 1):
        d = tmp_path / f"ipc2_s{seed}"
        d.mkdir()
        paths.append(str(random_digits_set(seed=seed).save(d / "best.pt", grid=False)))
    out = tmp_path / "results.json"
    assert cli.main(["evaluate", "--config", "digits/evaluate",
                     f"--synthetic=[{', '.join(paths)}]", "--runs", "2", "--baselines", "[]",
                     "--scores", "false", "--model.protocol.epochs", "3",
                     "--model_kwargs", json.dumps({"ConvNet": SMALL}),
                     "--trainer.accelerator", "cpu", "--output", str(out)]) == 0
    obj = json.loads(out.read_text())
    means = [r["results"]["ConvNet"]["mean"] for r in obj["rows"]]
    assert [r["path"] for r in obj["rows"]] == paths
    (g,) = obj["seed_groups"]
    assert g["seeds"] == [0, 1] and g["paths"] == paths and g["name"] == "ipc2"
    assert g["results"]["ConvNet"]["mean"] == pytest.approx(sum(means) / 2)
    assert g["results"]["ConvNet"]["std"] == pytest.approx(abs(means[0] - means[1]) / 2)
