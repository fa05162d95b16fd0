"""The library's one error family.

Every error raised for a user's input (a recipe key, a setting, a file, the data) is a
:class:`LightningDistillError`. Its subclasses also derive from the built-in exception a
caller may already catch (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so
``except ValueError`` keeps working. The command line reports any of them as one line
naming the file or field and what to do, with exit status 2
(``LIGHTNING_DISTILL_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "ConfigError",
    "DataFormatError",
    "InputError",
    "InputTypeError",
    "LightningDistillError",
    "MissingFileError",
    "StateError",
    "describe",
    "user_error",
]


class LightningDistillError(Exception):
    """The root of every error the library raises for a user's input."""


class InputError(LightningDistillError, ValueError):
    """A value, setting or argument that cannot work (out of range, inconsistent with
    another setting, of the wrong kind)."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong kind (a path where a set is needed, a module that is not
    an ``nn.Module``); ``except TypeError`` keeps catching it."""


class ConfigError(InputError):
    """A recipe or command line that the CLI cannot use: an unknown key, a missing file,
    a value of the wrong type, a recipe in an older format."""


class DataFormatError(InputError):
    """A data file (a data set, a synthetic set, a score file) that is not in the format
    it should be, or that belongs to other data or settings."""


class MissingFileError(LightningDistillError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class StateError(LightningDistillError, RuntimeError):
    """What is on disk or in a run cannot go on as asked (a store of another
    configuration, a half-finished artifact, ranks that disagree)."""


# ---------------------------------------------------------------- telling the user
def user_error(err: BaseException) -> LightningDistillError | None:
    """The library's own error behind ``err`` (a class that refused its arguments while
    the parser instantiated it is wrapped by jsonargparse)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LightningDistillError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def describe(err: BaseException, argv: Sequence[str] = (),
             keys: Callable[[str], Sequence[str]] | None = None) -> str:
    """The useful sentence of a parser or Lightning configuration error: the key, the
    reason, a close match and the ``--config`` file that holds the key, never a dump of
    the values or the whole usage. ``argv`` is the command line (its ``--config`` files
    are searched for the key; a key given on the command line is said to be there);
    ``keys(section)`` lists the valid keys of a section ("" the top level, "trainer"),
    for the close match of an unknown key outside a class's arguments."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    head = re.match(r'Parser key "([\w.]+)"', lines[0]) if lines else None
    reasons, cls = [], None
    for ln in lines[1:]:
        problem = re.match(r"- Problem with given class_path '([\w.]+)'", ln)
        if problem:
            cls = problem.group(1)
        elif ln.startswith("- ") and not re.match(r"- (Expected a <class 'NoneType'>|Not a "
                                                  r"valid subclass|a (class path|dict))", ln):
            reasons.append(ln[2:])
        elif re.match(r"(Option|Key) '", ln) or ln.startswith(
                ("Unrecognized", "the following arguments are required")):
            reasons.append(ln)
    if not reasons:
        missing = [c for c in re.findall(r"'class_path': '([\w.]+)'", str(err))
                   if not _importable(c)]
        reasons = [_no_such_class(missing[0]) if missing
                   else lines[0] if lines else type(err).__name__]
    text = reasons[0]
    required = re.match(r"the following arguments are required: (.+)", text)
    bad = None if required else re.search(r"(?i)(?:option|key|arguments:) '?(?:--)?([\w.]+)'?",
                                             text)
    if required:
        prefix = f"{head.group(1)}." if head else ""
        args = [prefix + a.strip().lstrip("-") for a in required.group(1).split(",")]
        owner = f"{cls.rsplit('.', 1)[-1]} needs" if cls else "missing"
        text = (f"{owner} {', '.join(args)} (required: set it in the recipe or as "
                f"--{args[0]} VALUE)")
    elif bad and cls is not None:
        names = _init_names(cls)
        close = difflib.get_close_matches(bad.group(1).rsplit(".", 1)[-1], names, n=1)
        text += f" by {cls.rsplit('.', 1)[-1]}" + (f" (did you mean '{close[0]}'?)"
                                                  if close else f"; its keys: {', '.join(names)}")
    elif bad and keys is not None:  # a top-level key, or one of a section's own
        first, _, rest = bad.group(1).partition(".")
        top = list(keys(""))
        section, name = ("", first) if first not in top or not rest else (first, rest)
        close = difflib.get_close_matches(name.split(".")[0], list(keys(section)) or top, n=1)
        if close:
            text += f" (did you mean '{(section + '.' if section else '') + close[0]}'?)"
    if head is None and type(err).__name__ == "MisconfigurationException":
        head = _trainer_key(text)
    key = f"key '{head.group(1)}': " if head else ""
    where = _where(argv, bad.group(1)) if bad else None
    if where is None and head is not None:
        where = _where(argv, head.group(1))
    return f"{where + ': ' if where else ''}{key}{text}"


#: words in Lightning's Trainer errors, by the Trainer argument they are about
_TRAINER_WORDS = {"accelerator": ("accelerator", "backend", "gpu", "cuda", "mps", "tpu"),
                  "devices": ("devices",), "strategy": ("strategy",),
                  "precision": ("precision",), "num_nodes": ("num_nodes",)}


def _trainer_key(text: str) -> re.Match | None:
    """A match whose group 1 is the ``trainer.<argument>`` a Trainer error is about."""
    lower = text.lower()
    for name, words in _TRAINER_WORDS.items():
        if any(w in lower for w in words):
            return re.match(r"(.*)", f"trainer.{name}")
    return None


def _importable(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _no_such_class(class_path: str) -> str:
    """``class_path 'X' does not exist`` with the closest name of its module."""
    module, _, name = class_path.rpartition(".")
    try:
        names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return f"class_path '{class_path}' does not exist (no module {module!r})"
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{module}.{close[0]}'?)" if close else ""
    return f"class_path '{class_path}' does not exist{hint}"


def _init_names(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _where(argv: Sequence[str], dotted: str) -> str | None:
    """Where the key ``dotted`` was given: "the command line" (a ``--...dotted`` option),
    else the last ``--config`` file whose text holds its last part as a YAML key."""
    if any(a.split("=", 1)[0].endswith(dotted) for a in argv if a.startswith("--")):
        return "the command line"
    key = dotted.rsplit(".", 1)[-1]
    files = [argv[k + 1] for k, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    pattern = re.compile(rf"^\s*-?\s*{re.escape(key)}\s*:", re.M)
    hits = [v for v in files
            if Path(v).is_file() and pattern.search(Path(v).read_text(encoding="utf-8"))]
    return hits[-1] if hits else None


