"""The ``lightning-distill`` command line: a LightningCLI.

    lightning-distill experts  --config digits/experts
    lightning-distill distill  --config digits/ipc10
    lightning-distill evaluate --config digits/evaluate
    lightning-distill run      --config digits/quickstart
    lightning-distill fit      --model lightning_distill.DistillationModule ...

LightningCLI maps a subcommand to the Trainer method of that name, so the stages are
methods of :class:`DistillTrainer` whose arguments are the keys a Trainer has no place
for (``store``, ``num_experts``, ``output``, ...); ``model:`` / ``data:`` / ``trainer:``
are the classes' own arguments. Each method hands its arguments to the stage's one
builder in :mod:`lightning_distill.stages`. ``run`` composes the three subcommands'
configs (:mod:`lightning_distill.stages.pipeline`) and runs each through this CLI.

Every subcommand takes one or more ``--config FILE.yaml`` (later files override earlier
ones; a packaged recipe can be named instead: ``--config digits/quickstart``), dotted
overrides and ``--print_config``; without ``--config`` it reads the digits recipe of
:data:`DEFAULT_RECIPES`. A user error (the library's :class:`LightningDistillError`, a
configuration the parser or Lightning refuses) is one line on stderr naming the file or
key, exit status 2; ``LIGHTNING_DISTILL_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI

from .allocator import reuse_freed_memory_on
from .errors import ConfigError, LightningDistillError, describe, user_error
from .stages._common import quiet_lightning
from .stages.recipes import (  # noqa: F401  (public here too)
    DEFAULT_RECIPES,
    RECIPES_DIR,
    config_files,
    default_recipe,
    packaged_recipes,
    prepare_argv,
    resolve_config,
)
from .stages.sets import SET_COMMANDS, run_set_command

#: one line per subcommand, for ``lightning-distill --help``
SUBCOMMAND_HELP = {
    "experts": "train expert trajectories on real data into a trajectory store",
    "distill": "distil a synthetic set by matching the experts' trajectories",
    "evaluate": "train fresh networks on synthetic sets and report test accuracy",
    "run": "experts -> distill -> evaluate for one recipe, resuming what exists",
    **SET_COMMANDS,  # import-set, export-set (stages/sets.py: not LightningCLI's)
    "fit": "Lightning's fit of any LightningModule / datamodule (--model CLASS --data CLASS)",
    "validate": "Lightning's validate of any module",
    "test": "Lightning's test of any module",
}


# ---------------------------------------------------------------- LightningCLI
class DistillTrainer(pl.Trainer):
    """A Trainer with the library's stages as methods (LightningCLI maps a subcommand to
    the Trainer method of that name). It keeps its constructor arguments
    (:attr:`init_kwargs`): the experts stage builds one Trainer per expert from them. On a
    CPU it tunes glibc's allocator to reuse freed memory (:mod:`lightning_distill.allocator`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init_kwargs: dict[str, Any] = dict(kwargs)
        if isinstance(kwargs.get("callbacks"), list):  # the Trainer adds its own to the list
            self.init_kwargs["callbacks"] = list(kwargs["callbacks"])
        super().__init__(*args, **kwargs)
        # on a CPU, glibc keeps freed large blocks for reuse (lightning_distill/allocator.py;
        # LIGHTNING_DISTILL_REUSE_MEMORY=0: off)
        reuse_freed_memory_on(self.strategy.root_device)

    def experts(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                store: str = "outputs/experts", num_experts: int = 10,
                group_size: int | None = None, seed: int = 0, shard_index: int = 0,
                num_shards: int = 1, log_dir: str | None = None) -> Any:
        """Train expert trajectories on real data into a trajectory store
        (:func:`lightning_distill.stages.experts.train_experts`).

        Args:
            model: an :class:`~lightning_distill.ExpertTrajectoryModule` (the template).
            datamodule: the real data (a :class:`~lightning_distill.RealDataModule`).
            store: the trajectory store's directory (finished experts are kept).
            num_experts: experts in the store (this run trains the missing ones).
            group_size: experts trained together as one vectorised model (1: one at a
                time; null: chosen by device and step size).
            seed: the experts' base seed (expert i draws from ``(seed, i)``).
            shard_index, num_shards: this process trains experts shard_index,
                shard_index + num_shards, ... (several processes on one store).
            log_dir: TensorBoard logs per expert (None: ``logs/`` beside the store).
        """
        from .stages.experts import train_experts

        return train_experts(model, datamodule, self.init_kwargs, trainer_class=type(self),
                             store=store, num_experts=num_experts, group_size=group_size,
                             seed=seed, shard_index=shard_index, num_shards=num_shards,
                             log_dir=log_dir)

    def distill(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                output: str | None = None, resume: bool = True) -> Path | None:
        """Distil a synthetic set by matching the experts' trajectories
        (:func:`lightning_distill.stages.distill.fit_distillation`).

        Args:
            model: a :class:`~lightning_distill.DistillationModule`.
            datamodule: the real data (a :class:`~lightning_distill.RealDataModule`).
            output: the run's directory; what the config leaves unset goes there:
                ``synthetic.pt``, ``checkpoints/``, ``best.pt``, ``logs/``.
            resume: skip a finished set, resume the IterationCheckpoint's ``last.ckpt``.
        """
        from .stages.distill import fit_distillation

        return fit_distillation(self, model, datamodule, resume=resume)

    def evaluate(self, model: pl.LightningModule,
                 datamodule: pl.LightningDataModule | None = None,
                 synthetic: list[str] | str | None = None,
                 models: list[str] | str | None = None,
                 model_kwargs: dict[str, dict[str, Any]] | None = None, runs: int = 5,
                 baselines: list[str] | None = None, random_lr: float = 0.01,
                 full_epochs: int = 50, full_lr: float = 0.01, full_batch_size: int = 256,
                 output: str | None = None, scores: bool = True) -> list[dict[str, Any]]:
        """Train fresh networks on synthetic sets and report their test accuracy
        (:func:`lightning_distill.stages.evaluate.evaluate_stage`), on this Trainer's device
        and, where the protocol leaves it unset, in its precision.

        Args:
            model: an :class:`~lightning_distill.EvalModule` without a set: every run's
                architecture, protocol and seed (run r: seed + r).
            synthetic: synthetic set files (one or a list).
            models: architectures (None: ``model.model``; several: cross-architecture).
            model_kwargs: ``build_model`` keywords per architecture (over the experts').
            runs: networks per set and architecture.
            baselines: ``random`` (a random real subset of the same ipc per run) and/or
                ``full`` (the whole training split).
            random_lr: the random baseline's lr.
            full_epochs, full_lr, full_batch_size: the full-data baseline's protocol.
            output: results.json (docs/formats.md).
            scores: DD-Ranking's HLR, IOR, LRS, ARS for every set (extra runs; method.md).
        """
        from .stages.evaluate import EVALUATE_OPTIONS, evaluate_stage

        options = {k: v for k, v in locals().items() if k in EVALUATE_OPTIONS}
        return evaluate_stage(model, datamodule, device=self.strategy.root_device,
                              precision=self.precision, **options)


def _native_classes(subcommand: str | None) -> tuple[type | None, type | None]:
    """(model class, datamodule class) of a library subcommand; (None, None) for
    Lightning's fit / validate / test (any module: ``--model CLASS``)."""
    if subcommand not in ("experts", "distill", "evaluate"):
        return None, None
    from .data.datamodule import RealDataModule
    from .modules import DistillationModule, EvalModule, ExpertTrajectoryModule

    return {"experts": ExpertTrajectoryModule, "distill": DistillationModule,
            "evaluate": EvalModule}[subcommand], RealDataModule


#: Trainer defaults per subcommand (a config or the command line overrides them)
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    # the module stops itself after its iterations; an iteration takes seconds: log each
    "distill": {"max_epochs": -1, "log_every_n_steps": 1},
    # the store is what an expert leaves: no per-expert ModelCheckpoint; step metrics every
    # 10 steps (Lightning's 50 is more than a small data set's epoch, and it warns)
    "experts": {"enable_checkpointing": False, "log_every_n_steps": 10},
}


def _subcommand(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


class LightningDistillCLI(LightningCLI):
    """``lightning-distill`` as a LightningCLI: under ``experts`` / ``distill`` /
    ``evaluate`` the model and data default to the subcommand's classes (subclass mode:
    a recipe gives plain arguments, ``--model.class_path my.Module`` swaps in a
    subclass); ``fit`` / ``validate`` / ``test`` are Lightning's, for any module.

    Embedding: ``LightningDistillCLI(args=["distill", "--config", "digits/ipc10"])``
    runs it; ``run=False`` only parses and instantiates.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.requested = _subcommand(argv)
        model_class, data_class = _native_classes(self.requested)
        kwargs.setdefault("trainer_class", DistillTrainer)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # the library's modules train with their method's own optimizer: no --optimizer
        # (check_own_optimizer refuses one set on a module under any LightningCLI)
        kwargs.setdefault("auto_configure_optimizers", model_class is None)
        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS.get(self.requested, {})))
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs.setdefault("prog", "lightning-distill")
        parser_kwargs.setdefault("description",
                                 "Dataset distillation by trajectory matching (MTT, FTD, DATM).")
        # no abbreviated options (`--trainer.max_epoch` is a typo), and errors raised to
        # main(), which reports them in one line
        for kw in (parser_kwargs, *(parser_kwargs.setdefault(k, {}) for k in self.subcommands())):
            kw.setdefault("allow_abbrev", False)
            kw.setdefault("exit_on_error", False)
        if model_class is not None:
            parser_kwargs[self.requested].setdefault("epilog", (
                f"The model's arguments: lightning-distill {self.requested} --model.help "
                f"{model_class.__name__}; the data's: --data.help {data_class.__name__}."))
        with warnings.catch_warnings():
            # argv is sys.argv resolved (recipe names, the default recipe)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(model_class, data_class, subclass_mode_model=True,
                             subclass_mode_data=True, args=argv,
                             parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        model_class, data_class = _native_classes(self.requested)
        if model_class is not None:
            parser.set_defaults({key: {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
                                 for key, cls in (("model", model_class), ("data", data_class))})

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        subs = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        if self.requested in ("experts", "distill", "evaluate"):
            subs[self.requested] = {"model", "datamodule"}
        return subs

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "distill":
            from .stages.distill import fill_distill_outputs

            fill_distill_outputs(self.config["distill"])


class _Parsed(Exception):
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParsingCLI(LightningDistillCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.subcommand] if self.subcommand else self.config)


def parse_lightning_config(argv: Sequence[str]) -> Namespace:
    """The configuration a subcommand would run, parsed and checked but nothing
    instantiated (no store opened, no data read), as ``--print_config`` shows it."""
    try:
        _ParsingCLI(args=prepare_argv(argv))
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("parse_lightning_config: the command line ran instead of parsing")


# ---------------------------------------------------------------- errors in one line
def _report(name: str, argv: Sequence[str], err: BaseException) -> int:
    """One line for a user error on stderr, exit status 2, unless
    LIGHTNING_DISTILL_TRACEBACK=1."""
    if os.environ.get("LIGHTNING_DISTILL_TRACEBACK", "") not in ("", "0"):
        raise err
    own = user_error(err)
    message = str(own) if own is not None else describe(err, argv, _keys_of(name))
    # a multi-line message on one line (a list's "- " bullets dropped, an option's "--" kept)
    message = "; ".join(part.strip().removeprefix("- ") for part in message.splitlines()
                        if part.strip())
    print(f"lightning-distill {name}: error: {message.strip()} (docs/recipes.md; "
          "LIGHTNING_DISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
    return 2


def _keys_of(subcommand: str):
    """``section -> its valid keys`` for a subcommand: the top level (the Trainer
    method's arguments and the config groups) and ``trainer``."""
    import inspect

    def names(fn: Any) -> list[str]:
        return [n for n, p in inspect.signature(fn).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]

    def keys(section: str) -> list[str]:
        if section == "trainer":
            return names(pl.Trainer.__init__)
        if section:
            return []
        method = getattr(DistillTrainer, subcommand, None)
        own = [n for n in names(method) if n not in ("model", "datamodule")] if method else []
        return ["seed_everything", "model", "data", "trainer", *own]
    return keys


def _usage() -> str:
    lines = ["usage: lightning-distill SUBCOMMAND [--config FILE|RECIPE] [--KEY VALUE ...]",
             "", "Dataset distillation by trajectory matching (MTT, FTD, DATM).", "",
             "subcommands (`lightning-distill SUBCOMMAND --help` for its keys):"]
    lines += [f"  {k:<10} {v}" for k, v in SUBCOMMAND_HELP.items()]
    lines += ["", f"packaged recipes (--config NAME): {', '.join(packaged_recipes())}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _subcommand(argv)
    if name not in SUBCOMMAND_HELP:
        asked = any(a in ("-h", "--help") for a in argv) and name is None
        close = difflib.get_close_matches(str(name), SUBCOMMAND_HELP, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if asked:
            print(_usage())
            return 0
        print(f"lightning-distill: error: unknown subcommand {name!r}{hint}; the "
              f"subcommands: {', '.join(SUBCOMMAND_HELP)}", file=sys.stderr)
        return 2
    quiet_lightning()
    try:
        if name in ("experts", "distill", "evaluate") and any(
                a.split("=", 1)[0] in ("--optimizer", "--lr_scheduler") for a in argv):
            raise ConfigError(f"--optimizer / --lr_scheduler: the {name} module trains with "
                              "its method's own SGD; set its lr and momentum through "
                              "--model.* (see --model.help)")
        if name in SET_COMMANDS:
            return run_set_command(name, argv[argv.index(name) + 1:])
        argv = prepare_argv(argv)
        if name == "run":
            from .stages.pipeline import run_pipeline

            run_pipeline(argv, launch=lambda args: LightningDistillCLI(args=list(args)),
                         check=parse_lightning_config)
        else:
            LightningDistillCLI(args=argv)
        return 0
    except (LightningDistillError, argparse.ArgumentError, MisconfigurationException) as err:
        return _report(name, argv, err)
    except ValueError as err:  # a class that refused its arguments while being instantiated
        if user_error(err) is None and "Does not validate" not in str(err):
            raise
        return _report(name, argv, err)


if __name__ == "__main__":
    raise SystemExit(main())
