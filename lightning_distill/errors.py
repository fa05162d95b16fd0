"""The library's one error family.

Every error raised for a user's input (a recipe key, a setting, a file, the data) is a
:class:`LightningDistillError`. Its subclasses also derive from the built-in exception a
caller may already catch (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so
``except ValueError`` keeps working. The command line reports any of them as one line
naming the file or field and what to do, with exit status 2
(``LIGHTNING_DISTILL_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataFormatError",
    "InputError",
    "LightningDistillError",
    "MissingFileError",
    "StateError",
]


class LightningDistillError(Exception):
    """The root of every error the library raises for a user's input."""


class InputError(LightningDistillError, ValueError):
    """A value, setting or argument that cannot work (out of range, inconsistent with
    another setting, of the wrong kind)."""


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
