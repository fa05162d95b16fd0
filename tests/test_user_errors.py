"""Every kind of user error through ``lightning-distill`` (issue 27): one line on stderr
naming the file or the key, exit status 2, and for the library's own checks a
:class:`LightningDistillError` (seen with ``LIGHTNING_DISTILL_TRACEBACK=1``, which
re-raises it instead of printing the line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_distill import LightningDistillError, cli
from lightning_distill.callbacks import PADDataSelection
from lightning_distill.data.datamodule import RealDataModule
from tests.data.formats import write_mnist
from tests.helpers import DIGITS_MODEL, build_digits_store, random_digits_set

FAST_EXPERTS = ["--num_experts", "1", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false"]


def _cb(class_path: str, **init_args) -> str:
    return json.dumps({"class_path": class_path, "init_args": init_args})


def one_line(argv: list[str], capsys, *names: str) -> str:
    """Run ``argv``; it must exit 2 with one stderr line that holds every name."""
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"lightning-distill {argv[0]}: error: ") or \
        line.startswith("lightning-distill: error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


def library_error(argv: list[str], monkeypatch) -> LightningDistillError:
    """The library's own error behind ``argv`` (the traceback mode re-raises it; a class
    refusing its arguments comes wrapped by the parser)."""
    from lightning_distill.errors import user_error

    monkeypatch.setenv("LIGHTNING_DISTILL_TRACEBACK", "1")
    with pytest.raises(Exception) as caught:
        cli.main(argv)
    own = user_error(caught.value)
    assert isinstance(own, LightningDistillError), repr(caught.value)
    return own


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return build_digits_store(tmp_path_factory.mktemp("digits") / "experts")


def test_a_bad_recipe_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ipcc: 3\n")
    line = one_line(["distill", "--config", "digits/ipc10", "--config", str(bad)], capsys,
                    str(bad), "ipcc", "did you mean 'ipc'")
    assert "Namespace(" not in line
    top = tmp_path / "top.yaml"
    top.write_text("num_expertz: 3\n")
    one_line(["experts", "--config", "digits/experts", "--config", str(top)], capsys,
             "num_expertz")


def test_a_missing_required_argument_names_the_file_the_key_and_the_class(tmp_path, capsys):
    """A data set without its ``name`` (RealDataModule's one required argument): the
    line names the recipe, ``data.name`` and the class, not the parser's wrapper."""
    recipe = tmp_path / "noname.yaml"
    recipe.write_text("data:\n  batch_size: 3\n", encoding="utf-8")
    line = one_line(["experts", "--config", str(recipe)], capsys, str(recipe),
                    "RealDataModule needs data.name", "--data.name VALUE")
    assert "Parser key" not in line and "Given value" not in line


def test_a_key_misspelt_inside_a_callbacks_init_args(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks:\n  - class_path: lightning_distill.callbacks."
                   "MatchingWindow\n    init_args:\n      max_start_epok: 3\n")
    one_line(["distill", "--config", "digits/ipc10", "--config", str(bad)], capsys,
             str(bad), "max_start_epok", "MatchingWindow", "did you mean 'max_start_epoch'")


def test_a_store_that_does_not_exist(tmp_path, capsys, monkeypatch):
    argv = ["distill", "--config", "digits/ipc10", "--model.store", str(tmp_path / "nope"),
            "--output", str(tmp_path / "out")]
    one_line(argv, capsys, str(tmp_path / "nope"))
    library_error(argv, monkeypatch)


def test_ipc_zero(tmp_path, capsys, monkeypatch, digits_store):
    argv = ["distill", "--config", "digits/ipc10", "--model.store", str(digits_store),
            "--model.ipc", "0", "--output", str(tmp_path / "out")]
    one_line(argv, capsys, "ipc")
    assert "ipc" in str(library_error(argv, monkeypatch))


def test_a_mismatched_score_file(tmp_path, capsys, monkeypatch):
    """A score file computed for other settings (1 scoring network, the run asks 2)."""
    dm = RealDataModule("digits", batch_size=64)
    dm.setup("fit")
    scores = tmp_path / "scores.pt"
    PADDataSelection(num_models=1, score_epochs=1, add_end_epoch=1,
                     remove_epochs=(2, 3)).prepare(dm, dict(DIGITS_MODEL), scores)
    callback = _cb("lightning_distill.callbacks.PADDataSelection", num_models=2,
                   score_epochs=1, add_end_epoch=1, remove_epochs=[2, 3],
                   scores_path=str(scores))
    argv = ["experts", "--config", "digits/experts", "--store", str(tmp_path / "store"),
            "--model.model_kwargs", "{width: 8, depth: 2}",
            f"--trainer.callbacks+={callback}", *FAST_EXPERTS]
    one_line(argv, capsys, str(scores))
    assert type(library_error(argv, monkeypatch)).__name__ == "DifficultyScoresError"


def test_a_bad_synthetic_set(tmp_path, capsys, monkeypatch):
    syn = random_digits_set(ipc=1)
    payload = syn.to_dict()
    payload["images"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(payload, path)
    argv = ["evaluate", "--config", "digits/evaluate", "--synthetic", str(path),
            "--baselines", "[]", "--runs", "1", "--trainer.enable_progress_bar", "false"]
    one_line(argv, capsys, str(path))
    library_error(argv, monkeypatch)


def test_a_bad_data_file(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    files = write_mnist(tmp_path / "fm", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
                        rng.integers(0, 10, 20, dtype=np.uint8),
                        rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
                        rng.integers(0, 10, 10, dtype=np.uint8), gz=False)
    bad = files["train_images"]
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    argv = ["experts", "--config", "digits/experts", "--data.name", "fashion_mnist",
            "--data.root", str(tmp_path / "fm"), "--store", str(tmp_path / "store"),
            *FAST_EXPERTS]
    one_line(argv, capsys, bad.name)
    library_error(argv, monkeypatch)


def test_an_accelerator_the_machine_lacks(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line(["experts", "--config", "digits/experts", "--trainer.accelerator", "gpu",
              "--store", str(tmp_path / "store")], capsys, "trainer.accelerator")


def test_an_unknown_subcommand(capsys):
    one_line(["no-such-subcommand", "--help"], capsys, "no-such-subcommand", "experts")
    one_line(["distil"], capsys, "did you mean 'distill'")


def test_an_older_recipe_gets_one_line_pointing_to_the_recipes_doc(tmp_path, capsys):
    old = tmp_path / "old.yaml"  # the format before LightningCLI: a `distill:` section
    old.write_text("store: s\ndistill:\n  ipc: 1\n")
    one_line(["distill", "--config", str(old)], capsys, str(old), "distill.ipc",
             "docs/recipes.md")
    run = tmp_path / "run.yaml"
    run.write_text("runs:\n- name: ipc1\n")
    one_line(["run", "--config", str(run)], capsys, str(run), "runs", "docs/recipes.md")


def test_the_traceback_mode_raises_the_error_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DISTILL_TRACEBACK", "1")
    with pytest.raises(LightningDistillError):
        cli.main(["distill", "--config", str(Path(tmp_path) / "missing.yaml")])


def test_the_library_raises_only_its_own_error_family():
    """Every error the package raises for a user's input is a LightningDistillError: no
    ``raise`` of a bare built-in error class is left, except the internal invariant
    listed here: a parse that ran instead of parsing (a bug, not an input), no free
    temporary file name (the file system, not an input), and IndexError for an index out
    of a store's range (Python's protocol for indexing)."""
    import ast
    import builtins

    import lightning_distill

    allowed = {("cli.py", "RuntimeError"), ("io.py", "FileExistsError"),
               ("trajectories.py", "IndexError")}
    builtin_errors = {n for n, v in vars(builtins).items() if isinstance(v, type)
                      and issubclass(v, Exception) and n != "NotImplementedError"}
    root = Path(lightning_distill.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id in builtin_errors:
                where = (str(path.relative_to(root)), node.exc.func.id)
                if where not in allowed:
                    found.append(f"{where[0]}:{node.lineno} {where[1]}")
    assert found == []
