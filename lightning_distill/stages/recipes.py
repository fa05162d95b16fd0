"""Recipe files: the YAML recipes shipped with the package, and the ``--config`` values
of a command line (a file, or a packaged recipe's name such as ``digits/quickstart``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..errors import ConfigError

#: the YAML recipes shipped inside the package (``recipes/`` in a checkout links here)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

#: the packaged recipe a subcommand reads when the command line names no ``--config``:
#: the digits pipeline (scikit-learn's bundled data set, minutes on a CPU)
DEFAULT_RECIPES = {"experts": "digits/experts", "distill": "digits/ipc10",
                   "evaluate": "digits/evaluate", "run": "digits/quickstart"}


def packaged_recipes() -> dict[str, Path]:
    """``{"digits/quickstart": path, ...}``: every recipe shipped with the package."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(RECIPES_DIR.glob("*/*.yaml"))}


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file path: an existing file as given, else a packaged
    recipe named ``dataset/name`` (``.yaml`` and a leading ``recipes/`` optional)."""
    if Path(value).expanduser().is_file():
        return value
    recipes = packaged_recipes()
    key = value.removeprefix("recipes/").removesuffix(".yaml")
    if key in recipes:
        return str(recipes[key])
    raise ConfigError(f"--config {value}: no such file, and no packaged recipe of that name. "
                      f"Packaged recipes (pass as --config NAME): {', '.join(recipes)}")


def _config_values(argv: Sequence[str]) -> list[tuple[int, str, bool]]:
    """Every ``--config`` value: (index of its token, value, ``--config=VALUE`` form)."""
    out = []
    for k, arg in enumerate(argv):
        if arg == "--config" and k + 1 < len(argv):
            out.append((k + 1, argv[k + 1], False))
        elif arg.startswith("--config="):
            out.append((k, arg.split("=", 1)[1], True))
    return out


def default_recipe(argv: Sequence[str]) -> str | None:
    """The recipe :func:`main` adds to a command line without ``--config`` (None when it
    has one, asks for help, or names no stage)."""
    stage = next((a for a in argv if a in DEFAULT_RECIPES), None)
    if stage is None or any(a in ("-h", "--help") for a in argv) or _config_values(argv):
        return None
    return DEFAULT_RECIPES[stage]


def prepare_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the default recipe added when it names no ``--config`` (said on
    stderr) and every ``--config`` resolved to a file and checked to be YAML."""
    argv = list(argv)
    recipe = default_recipe(argv)
    if recipe is not None:
        if "--print_config" not in argv:
            print(f"lightning-distill: no --config given: using the packaged recipe {recipe} "
                  f"({RECIPES_DIR / recipe}.yaml)", file=sys.stderr)
        k = next(i for i, a in enumerate(argv) if a in DEFAULT_RECIPES)
        argv[k + 1 : k + 1] = ["--config", recipe]
    for k, value, eq_form in _config_values(argv):
        file = resolve_config(value)
        argv[k] = ("--config=" if eq_form else "") + file
        try:
            yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{file}{where}: not valid YAML: "
                              f"{getattr(err, 'problem', None) or err}") from None
    return argv


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config`` files of ``argv``, in order."""
    return [v for _, v, _ in _config_values(argv)]
