"""The README's "Using the pieces in your own Lightning project" runs as written: its
Python example end to end (experts -> distillation -> evaluation on digits), and its
stock-LightningCLI ``main.py`` with ``experts.yaml`` (a shorter run on the command line)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

from lightning_distill import SyntheticSet, TrajectoryStore

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the pieces in your own Lightning project"


def blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the README section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def named(language: str, name: str) -> str:
    """The block whose first line is ``# <name>...``."""
    (hit,) = [b for b in blocks(language) if b.startswith(f"# {name}")]
    return hit


pytestmark = pytest.mark.usefixtures("quiet")


def test_the_python_example_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (example,) = [b for b in blocks("python") if not b.startswith("# ")]
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    store = TrajectoryStore.open(tmp_path / "outputs/example/experts")
    assert store.expert_indices() == [0, 1] and store.num_snapshots == 7
    final = SyntheticSet.load(tmp_path / "outputs/example/ipc10.pt")
    best = SyntheticSet.load(tmp_path / "outputs/example/best.pt")
    assert final.meta["iteration"] == 40 and final.images.shape == (100, 1, 8, 8)
    assert best.meta["selected_by"] == "validation accuracy"
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", capsys.readouterr().out)[1])
    assert 0.3 < accuracy <= 1.0  # ten classes: far above chance after 300 epochs
    # every stage logged to its logger (issue 28: the modules under any logger)
    logs = tmp_path / "outputs/example/logs"
    for name, metric in (("expert_0", "train/loss_epoch"), ("expert_1", "val/acc"),
                         ("evaluate", "test/acc")):
        header = (logs / name / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert metric in header.split(","), (name, header)
    assert list((logs / "distill" / "version_0").glob("events.out.tfevents.*"))


def test_the_stock_cli_main_py_records_experts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.py").write_text(named("python", "main.py"), encoding="utf-8")
    (tmp_path / "experts.yaml").write_text(named("yaml", "experts.yaml"), encoding="utf-8")
    for i in range(2):  # as the comment says, with 2 epochs instead of 50
        monkeypatch.setattr(sys, "argv", [
            "main.py", "fit", "--config", "experts.yaml", "--seed_everything", str(i),
            "--model.dsa_seed", str(i), "--data.shuffle_seed", str(i),
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
        runpy.run_path(str(tmp_path / "main.py"), run_name="__main__")
    store = TrajectoryStore.open(tmp_path / "outputs/digits/experts")
    store.validate(deep=True)
    assert store.expert_indices() == [0, 1] and store.num_snapshots == 3
    assert store.model["width"] == 32 and store.dataset == "digits"
