"""The ``lightning-distill`` command line.

    lightning-distill experts  --config recipes/digits/experts.yaml
    lightning-distill distill  --config recipes/digits/ipc10.yaml
    lightning-distill evaluate --config recipes/digits/evaluate.yaml
    lightning-distill run      --config recipes/digits/quickstart.yaml

Each stage takes one or more ``--config FILE.yaml`` (later files override earlier
ones; a packaged recipe can be named instead of a file: ``--config digits/quickstart``),
dotted overrides such as ``--data.root /data --trainer.devices 2`` and
``--print_config`` to show the merged configuration. The configuration of a stage is
a dataclass (``lightning_distill.stages.*``), parsed with jsonargparse, the engine of
Lightning's own LightningCLI; the stages are plain functions around Lightning
Trainers because training N experts or chaining stages is not a single ``fit``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from .trajectories import TrajectoryStoreError


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    function: str
    help: str


STAGES: dict[str, Stage] = {
    "experts": Stage("lightning_distill.stages.experts", "ExpertsConfig", "train_experts",
                     "train expert trajectories on real data into a trajectory store"),
    "distill": Stage("lightning_distill.stages.distill", "DistillConfig", "distill",
                     "distil a synthetic set by matching the experts' trajectories"),
    "evaluate": Stage("lightning_distill.stages.evaluate", "EvaluateConfig", "evaluate",
                      "train fresh networks on a synthetic set and report test accuracy"),
    "run": Stage("lightning_distill.stages.run", "RunConfig", "run",
                 "experts -> distill -> evaluate for one recipe, resuming what exists"),
}


def _load(stage: Stage):
    mod = importlib.import_module(stage.module)
    return getattr(mod, stage.config), getattr(mod, stage.function)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-distill",
        description="Dataset distillation by trajectory matching (MTT, FTD, DATM).",
        env_prefix="LIGHTNING_DISTILL",
        default_env=False,
        allow_abbrev=False,
    )
    subcommands = parser.add_subcommands(required=True, dest="stage")
    for name, stage in STAGES.items():
        sub = ArgumentParser(prog=f"lightning-distill {name}", description=stage.help,
                             print_config="--print_config", allow_abbrev=False)
        sub.add_argument("--config", action=ActionConfigFile,
                         help="YAML recipe; may be given several times")
        config_cls, _ = _load(stage)
        sub.add_class_arguments(config_cls, nested_key=None, as_group=False)
        subcommands.add_subcommand(name, sub, help=stage.help)
    return parser


class ConfigError(ValueError):
    """A ``--config`` file is missing or holds a key the stage does not know."""


def _unknown_keys(cls: type, data: dict, prefix: str = "") -> list[tuple[str, str, list[str]]]:
    """(dotted key, bad name, valid names at that level) for every key of ``data`` that is
    not a field of dataclass ``cls`` (recursing into nested dataclasses and lists of them)."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        if key not in names:
            out.append((f"{prefix}{key}", str(key), names))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out += _unknown_keys(hint, value, f"{prefix}{key}.")
        elif typing.get_origin(hint) is list and isinstance(value, list):
            (item,) = typing.get_args(hint) or (None,)
            if dataclasses.is_dataclass(item):
                for k, v in enumerate(value):
                    if isinstance(v, dict):
                        out += _unknown_keys(item, v, f"{prefix}{key}[{k}].")
    return out


#: the YAML recipes shipped inside the package (``recipes/`` in a checkout links here)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def packaged_recipes() -> dict[str, Path]:
    """``{"digits/quickstart": path, ...}``: every recipe shipped with the package."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(RECIPES_DIR.glob("*/*.yaml"))}


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file path: an existing file as given, else a packaged
    recipe named ``dataset/name`` (``.yaml`` and a leading ``recipes/`` optional), so a
    pip-installed package runs ``--config cifar10/ipc10`` from any directory."""
    if Path(value).expanduser().is_file():
        return value
    key = value.removeprefix("recipes/").removesuffix(".yaml")
    recipes = packaged_recipes()
    if key in recipes:
        return str(recipes[key])
    raise ConfigError(
        f"lightning-distill: error: --config {value}: no such file, and no packaged recipe "
        f"of that name. Packaged recipes (pass as --config NAME): {', '.join(recipes)}"
    )


#: the packaged recipe a stage reads when the command line names no ``--config``: the
#: digits pipeline (scikit-learn's bundled data set, minutes on a CPU)
DEFAULT_RECIPES: dict[str, str] = {
    "experts": "digits/experts",
    "distill": "digits/ipc10",
    "evaluate": "digits/evaluate",
    "run": "digits/quickstart",
}


def default_recipe(argv: Sequence[str]) -> str | None:
    """The recipe :func:`parse_config` adds for a command line without ``--config``
    (None when it has one, asks for help, or names no stage)."""
    stage = next((a for a in argv if a in STAGES), None)
    if stage is None or any(a in ("-h", "--help") for a in argv):
        return None
    if _config_values(argv):
        return None
    return DEFAULT_RECIPES[stage]


def _resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config`` value passed through :func:`resolve_config`."""
    out = list(argv)
    for k, value, eq_form in _config_values(out):
        out[k] = ("--config=" if eq_form else "") + resolve_config(value)
    return out


def _config_values(argv: Sequence[str]) -> list[tuple[int, str, bool]]:
    """Every ``--config`` value in ``argv``: (index of the token holding it, the value,
    whether it is the ``--config=VALUE`` form)."""
    out = []
    for k, arg in enumerate(argv):
        if arg == "--config" and k + 1 < len(argv):
            out.append((k + 1, argv[k + 1], False))
        elif arg.startswith("--config="):
            out.append((k, arg.split("=", 1)[1], True))
    return out


def _config_files(argv: Sequence[str], name: str) -> list[str]:
    """The ``--config`` files given to stage ``name`` in ``argv``."""
    if name not in argv:
        return []
    return [v for _, v, _ in _config_values(list(argv)[list(argv).index(name) + 1 :])]


def check_config_files(name: str, argv: Sequence[str]) -> None:
    """Fail with the file, the key and a suggestion for a YAML key that stage ``name``
    does not know (jsonargparse alone names neither the file nor a close match)."""
    config_cls, _ = _load(STAGES[name])
    for file in _config_files(argv, name):
        try:
            data: Any = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports unreadable files itself
        if not isinstance(data, dict):
            continue
        bad = _unknown_keys(config_cls, data)
        if bad:
            dotted, key, names = bad[0]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"lightning-distill {name}: error: {file}: unknown key '{dotted}'{hint}; "
                f"valid keys there: {', '.join(names)}. See `lightning-distill {name} --help`."
            )


def parse_config(argv: Sequence[str]) -> tuple[str, Any]:
    """Parse a command line (without the program name) into ``(stage, config dataclass)``.

    ``--config`` takes a file or a packaged recipe name (:func:`resolve_config`); without
    any, the stage reads its :data:`DEFAULT_RECIPES` entry (the digits pipeline).
    Raises :class:`ConfigError` for a missing config file or an unknown key in one,
    SystemExit (as argparse does) for other errors, ``--help`` and ``--print_config``.
    """
    argv = list(argv)
    recipe = default_recipe(argv)
    if recipe is not None:
        k = next(i for i, a in enumerate(argv) if a in STAGES)
        argv[k + 1 : k + 1] = ["--config", recipe]
    argv = _resolve_config_args(argv)
    stage_name = next((a for a in argv if a in STAGES), None)
    if stage_name is not None:
        check_config_files(stage_name, argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    name = ns.stage
    config_cls, _ = _load(STAGES[name])
    sub_ns = ns[name]
    sub_ns.pop("config", None)
    sub_parser = parser._subcommands_action._name_parser_map[name]
    instantiate = getattr(sub_parser, "instantiate", None) or sub_parser.instantiate_classes
    init = instantiate(sub_ns)
    fields = config_cls.__dataclass_fields__
    return name, config_cls(**{k: v for k, v in init.items() if k in fields})


#: what bad input raises in the library (each with a message naming the file or field and
#: what to do): reported as one line, exit status 2, unless LIGHTNING_DISTILL_TRACEBACK=1
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError,
                                                IsADirectoryError, TrajectoryStoreError)


class _OnceFilter(logging.Filter):
    """Pass each distinct INFO line once per process: a stage that starts one Trainer per
    expert would otherwise repeat Lightning's banner lines ("GPU available ...") for every
    expert. Warnings and errors always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _quiet_repeated_lightning_info() -> None:
    for handler in logging.getLogger("pytorch_lightning").handlers:
        if not any(isinstance(f, _OnceFilter) for f in handler.filters):
            handler.addFilter(_OnceFilter())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = default_recipe(argv)
    if recipe is not None and "--print_config" not in argv:
        print(f"lightning-distill: no --config given: using the packaged recipe {recipe} "
              f"({RECIPES_DIR / recipe}.yaml)", file=sys.stderr)
    try:
        name, cfg = parse_config(argv)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    _, function = _load(STAGES[name])
    _quiet_repeated_lightning_info()
    try:
        function(cfg)
    except USER_ERRORS as err:
        if os.environ.get("LIGHTNING_DISTILL_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"lightning-distill {name}: error: {type(err).__name__}: {err}\n"
              "(set LIGHTNING_DISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
