"""`lightning-distill distill` (and `experts`) as a LightningCLI: every packaged recipe
prints a config that parses back, the printed config reproduces the run bit for bit, resume / skip /
extend, LightningCLI's own options (--trainer.logger, --trainer.callbacks+=,
--trainer.max_time) and the errors of bad input."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_distill import cli
from lightning_distill.cli import parse_lightning_config
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.modules.distill import DistillationModule
from tests.helpers import build_digits_store

ROOT = Path(__file__).resolve().parents[1]
DISTILL_RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("*/*.yaml")
    if not p.name.startswith(("experts", "evaluate")) and p.name not in ("quickstart.yaml",
                                                                          "run.yaml"))
EXPERTS_RECIPES = sorted((ROOT / "recipes").glob("*/experts*.yaml"))
EVALUATE_RECIPES = sorted((ROOT / "recipes").glob("*/evaluate*.yaml"))
NATIVE_RECIPES = ([("distill", p) for p in DISTILL_RECIPES]
                  + [("experts", p) for p in EXPERTS_RECIPES]
                  + [("evaluate", p) for p in EVALUATE_RECIPES])

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return build_digits_store(tmp_path_factory.mktemp("digits") / "experts")


def recipe(tmp_path: Path, store: Path, iterations: int = 4, **model) -> Path:
    """A tiny digits distill recipe in the LightningCLI format."""
    m = {"store": str(store), "ipc": 1, "iterations": iterations, "syn_steps": 3,
         "max_start_epoch": 2, "lr_img": 10.0, "lr_lr": 1e-4, "learn_labels": True,
         "seed": 3, **model}
    text = json.dumps({
        "model": m, "data": {"name": "digits"},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": [
                        {"class_path": "lightning_distill.callbacks.MatchingWindow",
                         "init_args": {"min_start_epoch": 0, "current_max_start_epoch": 1,
                                       "max_start_epoch": 2, "expansion_end": 2,
                                       "sequential": True}},
                        {"class_path": "lightning_distill.callbacks.SyntheticEMA",
                         "init_args": {"decay": 0.9}},
                        {"class_path": "lightning_distill.callbacks.IterationCheckpoint",
                         "init_args": {"every_n": 2}}]}})
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")  # JSON is YAML
    return path


def settings(args: list[str], sub: str = "distill") -> dict:
    """The parsed configuration without the names of the files it came from."""
    config = parse_lightning_config([sub, *args]).as_dict()
    config.pop("config", None)
    return config


def run(*args: str) -> int:
    return cli.main(["distill", *args])


def synthetic(out: Path) -> SyntheticSet:
    return SyntheticSet.load(out / "synthetic.pt")


@pytest.mark.parametrize("sub, path", NATIVE_RECIPES,
                         ids=lambda x: x if isinstance(x, str) else f"{x.parent.name}/{x.name}")
def test_every_recipe_prints_a_config_that_parses_back(sub, path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([sub, "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert settings(["--config", str(printed)], sub) == settings(["--config", str(path)], sub)


def test_printed_config_reproduces_the_run_bit_for_bit(digits_store, tmp_path, capsys):
    config = recipe(tmp_path, digits_store)
    assert run("--config", str(config), "--output", str(tmp_path / "a")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run("--config", str(config), "--output", str(tmp_path / "a"), "--print_config")
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert run("--config", str(printed), "--output", str(tmp_path / "b")) == 0
    a, b = synthetic(tmp_path / "a"), synthetic(tmp_path / "b")
    assert a.meta["iteration"] == b.meta["iteration"] == 4
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.lr == b.lr
    # LightningCLI saved the complete configuration next to the logs
    saved = (tmp_path / "a" / "logs" / "config.yaml").read_text(encoding="utf-8")
    assert "store:" in saved and "MatchingWindow" in saved
    assert (tmp_path / "a" / "synthetic_ema.pt").is_file()


class CountingDistillation(DistillationModule):
    """A user's subclass: counts its training steps, distils as its parent."""

    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


class NamedDigits(RealDataModule):
    """A user's datamodule subclass (the same data)."""

    built = 0

    def setup(self, stage):
        type(self).built += 1
        super().setup(stage)


def test_subclass_mode_takes_a_users_module_and_datamodule(digits_store, tmp_path):
    """Subclass mode: `--model.class_path` / `--data.class_path` swap in a user's classes,
    the recipe's plain arguments go to them, and the set is the parent classes' bit for bit."""
    config = recipe(tmp_path, digits_store)
    assert run("--config", str(config), "--output", str(tmp_path / "base")) == 0
    assert run("--config", str(config), "--output", str(tmp_path / "sub"),
               "--model.class_path", f"{__name__}.CountingDistillation",
               "--data.class_path", f"{__name__}.NamedDigits") == 0
    assert CountingDistillation.steps == 4 and NamedDigits.built >= 1
    a, b = synthetic(tmp_path / "base"), synthetic(tmp_path / "sub")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    saved = (tmp_path / "sub" / "logs" / "config.yaml").read_text(encoding="utf-8")
    assert "CountingDistillation" in saved and "NamedDigits" in saved


def test_rerun_skips_a_finished_set_and_more_iterations_extend_it(digits_store, tmp_path):
    config, out = recipe(tmp_path, digits_store), tmp_path / "run"
    assert run("--config", str(config), "--output", str(out)) == 0
    stamp = (out / "synthetic.pt").stat().st_mtime_ns
    assert run("--config", str(config), "--output", str(out)) == 0
    assert (out / "synthetic.pt").stat().st_mtime_ns == stamp  # not distilled again
    assert run("--config", str(config), "--output", str(out), "--model.iterations", "6") == 0
    assert synthetic(out).meta["iteration"] == 6
    longer = tmp_path / "six"
    assert run("--config", str(config), "--output", str(longer), "--model.iterations", "6") == 0
    assert torch.equal(synthetic(out).images, synthetic(longer).images)


def test_csv_logger_gets_every_iteration_and_a_stock_checkpoint_monitors_the_loss(
        digits_store, tmp_path):
    config, out = recipe(tmp_path, digits_store), tmp_path / "run"
    logger = json.dumps({"class_path": "pytorch_lightning.loggers.CSVLogger",
                         "init_args": {"save_dir": str(out), "name": "csv", "version": ""}})
    best = json.dumps({"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": str(out / "best"), "monitor": "distill/loss",
                                     "filename": "lowest", "save_top_k": 1,
                                     "every_n_train_steps": 1}})
    assert run("--config", str(config), "--output", str(out), f"--trainer.logger={logger}",
               f"--trainer.callbacks+={best}") == 0
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("distill/loss", "distill/syn_lr"):
        assert sorted(int(r["step"]) for r in rows if r.get(name)) == [0, 1, 2, 3], name
    assert (out / "best" / "lowest.ckpt").is_file()
    assert (out / "csv" / "config.yaml").is_file()


class SlowIterations(Callback):
    """At least a second per iteration, so a time budget stops a run part-way."""

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(1.0)


def test_a_run_stopped_by_max_time_and_rerun_equals_an_uninterrupted_one(digits_store,
                                                                          tmp_path):
    config = recipe(tmp_path, digits_store)
    assert run("--config", str(config), "--output", str(tmp_path / "whole")) == 0
    out = tmp_path / "stopped"
    assert run("--config", str(config), "--output", str(out), "--trainer.max_time=00:00:00:02",
               "--trainer.callbacks+=tests.test_cli_distill.SlowIterations") == 0
    assert 0 < synthetic(out).meta["iteration"] < 4
    assert run("--config", str(config), "--output", str(out)) == 0  # resumes by itself
    whole, resumed = synthetic(tmp_path / "whole"), synthetic(out)
    assert resumed.meta["iteration"] == 4
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.labels,
                                                                     resumed.labels)


def test_an_older_format_recipe_is_refused_with_what_to_do(tmp_path, capsys):
    """The format before LightningCLI (``store`` / ``distill`` / ``window`` sections): one
    line naming the file and the key, pointing to docs/recipes.md."""
    old = tmp_path / "old.yaml"
    old.write_text("store: s\ndistill:\n  ipc: 1\nwindow:\n  max_start_epoch: 2\n",
                   encoding="utf-8")
    assert run("--config", str(old)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lightning-distill distill: error: {old}: ")
    assert any(f"'{key}" in err for key in ("store", "distill", "window"))
    assert "docs/recipes.md" in err


@pytest.mark.parametrize("text, message", [
    ("model:\n  ipcc: 1\n", "key 'model': Option 'ipcc' is not accepted by DistillationModule "
     "(did you mean 'ipc'?)"),
    ("modl:\n  ipc: 1\n", "(did you mean 'model'?)"),
    ("data:\n  nam: digits\n", "key 'data': Option 'nam' is not accepted by RealDataModule "
     "(did you mean 'name'?)"),
    ("model:\n  ipc: [1\n", "line 3, column 1: not valid YAML"),
])
def test_bad_config_files_name_the_file_and_the_key_or_line(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    assert run("--config", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lightning-distill distill: error: {bad}")
    assert message in err


def test_an_invalid_value_names_its_key(digits_store, tmp_path, capsys):
    config = recipe(tmp_path, digits_store)
    assert run("--config", str(config), "--output", str(tmp_path / "r"),
               "--model.lr_img", "-5") == 2
    err = capsys.readouterr().err
    assert "lr_img must be >= 0" in err and "lightning-distill distill: error" in err
