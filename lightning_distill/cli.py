"""The ``lightning-distill`` command line.

    lightning-distill experts  --config digits/experts
    lightning-distill distill  --config digits/ipc10
    lightning-distill evaluate --config digits/evaluate
    lightning-distill run      --config digits/quickstart
    lightning-distill fit      --model lightning_distill.DistillationModule ...

``experts``, ``distill`` and ``evaluate`` (and Lightning's own ``fit`` / ``validate`` /
``test``) are a
:class:`pytorch_lightning.cli.LightningCLI` (:class:`LightningDistillCLI`; the
subcommands are methods of :class:`DistillTrainer`, as LightningCLI maps a subcommand to
a Trainer method): a recipe is a standard Lightning config, ``model:`` the module's own
arguments (ExpertTrajectoryModule, DistillationModule), ``data:`` the RealDataModule's,
``trainer:`` the Trainer's (its ``callbacks:`` list holds GSAM, MatchingWindow,
PeriodicEvaluation, SyntheticEMA, ...), plus the keys a Trainer has no place for
(``store``, ``num_experts``, ``output``, ...). Everything LightningCLI gives comes with
it (``--trainer.callbacks+=``, ``--trainer.logger``, ``--trainer.max_time``,
``--print_config``, the config.yaml saved with the logs). docs/recipes.md has the format
and how an older recipe maps to it.

``evaluate`` is one too (model EvalModule without a set: every run's protocol). ``run``
chains them: its recipe holds one section per stage in that subcommand's format plus
the shared ``data`` / ``trainer`` (:mod:`lightning_distill.stages.pipeline`), and each
merged section runs through the same LightningCLI.

Every subcommand takes one or more ``--config FILE.yaml`` (later files override earlier
ones; a packaged recipe can be named instead of a file: ``--config digits/quickstart``),
dotted overrides such as ``--data.root /data --trainer.devices 2`` and
``--print_config``; without ``--config`` it reads the digits recipe of
:data:`DEFAULT_RECIPES`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import Namespace
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from .functional.evaluation import DEFAULT_GROUP_SIZE
from .stages.data_selection import DataSelectionConfig
from .stages.migrate import (  # noqa: F401  (public: the errors point here)
    convert_distill_recipe,
    convert_evaluate_recipe,
    convert_experts_recipe,
    convert_run_recipe,
)
from .trajectories import TrajectoryStoreError


class ConfigError(ValueError):
    """A ``--config`` file is missing or holds a key the stage does not know."""


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
    """The recipe :func:`main` adds for a command line without ``--config``
    (None when it has one, asks for help, or names no stage)."""
    stage = next((a for a in argv if a in DEFAULT_RECIPES), None)
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


# ---------------------------------------------------------------- LightningCLI
class DistillTrainer(pl.Trainer):
    """A Trainer with the library's subcommands as methods: LightningCLI maps a
    subcommand to the Trainer method of that name (its arguments become the
    subcommand's keys, as ``ckpt_path`` is ``fit``'s). It keeps its constructor
    arguments (:attr:`init_kwargs`): :meth:`experts` builds one Trainer per expert from
    them, with fresh copies of the callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init_kwargs: dict[str, Any] = dict(kwargs)
        if isinstance(kwargs.get("callbacks"), list):  # the Trainer adds its own to the list
            self.init_kwargs["callbacks"] = list(kwargs["callbacks"])
        super().__init__(*args, **kwargs)

    def experts(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                store: str = "outputs/experts", num_experts: int = 10,
                group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, shard_index: int = 0,
                num_shards: int = 1, data_selection: DataSelectionConfig | None = None,
                log_dir: str | None = None) -> Any:
        """Train expert trajectories on real data into a trajectory store.

        Expert i is a fresh ``model`` (its arguments: architecture, SGD, DSA; the shapes
        from the data) trained for ``trainer.max_epochs`` epochs by a Trainer of this
        one's arguments (fresh copies of its callbacks: GSAM, ...), with all its
        randomness from ``(seed, i)``; its snapshots go to ``store`` (docs/formats.md).
        Finished experts are kept, so rerunning resumes.

        Args:
            model: an :class:`~lightning_distill.ExpertTrajectoryModule` (the template).
            datamodule: the real data (a :class:`~lightning_distill.RealDataModule`).
            store: the trajectory store's directory.
            num_experts: experts in the store (this run trains the missing ones).
            group_size: experts trained together as one vectorised model (1: one at a time).
            seed: the experts' base seed.
            shard_index, num_shards: this process trains experts shard_index,
                shard_index + num_shards, ... (several processes on one store).
            data_selection: PAD's easy-to-hard data selection (off by default).
            log_dir: TensorBoard logs per expert (None: ``logs/`` beside the store) when
                the Trainer's logger is the default.
        """
        from .callbacks.data_selection import PADDataSelection
        from .callbacks.sharpness import sharpness_settings
        from .data.augment import dsa_flip_for
        from .modules.expert import ExpertTrajectoryModule
        from .stages._common import make_callbacks, say
        from .stages.experts import ExpertPlan, check_plan, run_experts

        if not isinstance(model, ExpertTrajectoryModule):
            raise TypeError(f"experts needs an ExpertTrajectoryModule, got {type(model).__name__}")
        if datamodule is None:
            raise ValueError("experts needs the real data: a datamodule (data: in a recipe)")
        epochs = self.init_kwargs.get("max_epochs")
        if epochs is None:
            raise ValueError("experts: set trainer.max_epochs (the epochs of every expert)")
        hp = model.hparams
        flip = hp.dsa_flip if hp.dsa_flip is not None else dsa_flip_for(datamodule.name)
        module_kwargs = {"model": hp.model, "model_kwargs": dict(hp.model_kwargs or {}),
                         "lr": hp.lr, "momentum": hp.momentum,
                         "weight_decay": hp.weight_decay, "dsa": hp.dsa,
                         "dsa_strategy": hp.dsa_strategy, "dsa_flip": flip}
        given = self.init_kwargs.get("callbacks") or []
        given = list(given) if isinstance(given, (list, tuple)) else [given]
        # LightningCLI's SaveConfigCallback is shared (it saves the config once); the
        # others are copied afresh for each Trainer
        shared = [c for c in given if type(c).__name__ == "SaveConfigCallback"]
        templates = [c for c in given if c not in shared]
        selections = [c for c in templates if isinstance(c, PADDataSelection)]
        if selections and (len(selections) > 1 or (data_selection and data_selection.enabled)):
            raise ValueError("experts: one data selection at a time: a PADDataSelection "
                             "callback or `data_selection: {enabled: true}`, not both")
        cls = type(model)
        if cls is not ExpertTrajectoryModule:
            # a user's subclass: built with its own arguments too (LightningCLI adds
            # `_class_path` and the like to the hparams: not arguments)
            module_kwargs.update({k: v for k, v in hp.items() if not k.startswith("_") and
                                  k not in (*module_kwargs, "channels", "num_classes",
                                            "image_size", "dsa_seed")})
        # a vectorised group is GroupExpertModule, which knows nothing of a subclass, and
        # trains from one loader per member, which a selection callback does not reach
        alone = (f"{cls.__name__} is a subclass of ExpertTrajectoryModule"
                 if cls is not ExpertTrajectoryModule else
                 "a PADDataSelection callback selects the data" if selections else None)
        if alone is not None and group_size != 1:
            say(f"experts: {alone}, so its experts train one at a time (group_size 1, not "
                f"{group_size})")
            group_size = 1
        logs = Path(log_dir) if log_dir is not None else Path(store).parent / "logs"

        def make_trainer(cbs: list[Callback], version: str, first: bool) -> pl.Trainer:
            kw = dict(self.init_kwargs)
            kw["callbacks"] = make_callbacks(kw.get("enable_progress_bar") is not False,
                                             [*copy.deepcopy(templates), *shared, *cbs])
            logger = kw.get("logger")
            kw["logger"] = (TensorBoardLogger(str(logs), name="experts", version=version,
                                              default_hp_metric=False)
                            if logger in (None, True) else copy.deepcopy(logger))
            kw.setdefault("enable_checkpointing", False)  # the store is what an expert leaves
            kw["enable_model_summary"] = first and kw.get("enable_model_summary") is not False
            return type(self)(**kw)

        plan = ExpertPlan(
            store=str(store), num_experts=num_experts, epochs=int(epochs),
            module_kwargs=module_kwargs, make_trainer=make_trainer,
            extra_callbacks=lambda indices: [], seed=seed, group_size=group_size,
            shard_index=shard_index, num_shards=num_shards, module_class=cls,
            data_selection=data_selection or DataSelectionConfig(),
            accelerator=str(self.init_kwargs.get("accelerator", "auto")),
            hparams={"experts": {**{k: v for k, v in module_kwargs.items() if k != "model"},
                                 "num_experts": num_experts, "epochs": int(epochs)},
                     "sharpness": sharpness_settings(templates), "seed": seed,
                     **({"data_selection": selections[0].hparams()} if selections else {}),
                     "batch_size": datamodule.batch_size})
        check_plan(plan)
        if rank_zero_only.rank == 0:
            datamodule.prepare_data()
        datamodule.setup("fit")
        return run_experts(plan, datamodule)

    def evaluate(self, model: pl.LightningModule,
                 datamodule: pl.LightningDataModule | None = None,
                 synthetic: list[str] | str | None = None,
                 models: list[str] | str | None = None,
                 model_kwargs: dict[str, dict[str, Any]] | None = None, runs: int = 5,
                 baselines: list[str] | None = None, random_lr: float = 0.01,
                 full_epochs: int = 50, full_lr: float = 0.01, full_batch_size: int = 256,
                 output: str | None = None) -> list[dict[str, Any]]:
        """Train fresh networks on synthetic sets and report their test accuracy.

        Every run is ``model`` (an :class:`~lightning_distill.EvalModule` without a set:
        its architecture, evaluation protocol and seed) trained on each set, ``runs``
        networks per set and architecture (run r: seed + r; ``protocol.group_size`` of
        them as one vectorised model), tested on the real test split of ``datamodule``,
        on this Trainer's device.

        Args:
            synthetic: synthetic set files (one or a list).
            models: architectures (None: ``model.model``; several: cross-architecture).
            model_kwargs: ``build_model`` keywords per architecture (over those of the
                experts, read from each set, and ``model.model_kwargs``).
            runs: networks per set and architecture.
            baselines: ``random`` (a random real subset of the same ipc per run) and/or
                ``full`` (the whole training split).
            random_lr: the random baseline's lr.
            full_epochs, full_lr, full_batch_size: the full-data baseline's protocol.
            output: results.json (docs/formats.md).
        """
        from .modules.evaluate import EvalModule
        from .stages.evaluate import evaluate_sets

        if not isinstance(model, EvalModule):
            raise TypeError(f"evaluate needs an EvalModule, got {type(model).__name__}")
        if type(model) is not EvalModule:
            # the runs are trained by the evaluation protocol (K at a time, baselines
            # beside them), not by the module's own steps, which a subclass may change
            raise ValueError(
                f"evaluate: model.class_path {type(model).__name__} is a subclass of "
                f"EvalModule, whose steps this subcommand does not run (it trains the runs "
                f"with the evaluation protocol); fit and test it with `lightning-distill fit "
                f"--model {type(model).__name__} --data lightning_distill.SyntheticDataModule` "
                f"and `test`, or use EvalModule")
        if not isinstance(model.hparams.seed, int):
            raise ValueError("evaluate: model.seed must be one int (run r uses seed + r)")
        if datamodule is None:
            raise ValueError("evaluate needs the real data: a datamodule (data: in a recipe)")
        sets = [synthetic] if isinstance(synthetic, str) else list(synthetic or [])
        archs = [models] if isinstance(models, str) else list(models or [model.hparams.model])
        kwargs = {model.hparams.model: dict(model.hparams.model_kwargs or {})}
        for name, kw in (model_kwargs or {}).items():
            kwargs[name] = {**kwargs.get(name, {}), **kw}
        if rank_zero_only.rank == 0:
            datamodule.prepare_data()
        datamodule.setup("test")
        config = {"synthetic": sets, "models": archs, "model_kwargs": kwargs, "runs": runs,
                  "baselines": list(baselines or []), "random_lr": random_lr,
                  "full_epochs": full_epochs, "full_lr": full_lr,
                  "full_batch_size": full_batch_size, "seed": int(model.hparams.seed),
                  "protocol": model.protocol.as_kwargs(), "data": datamodule.name}
        return evaluate_sets(
            datamodule, sets, protocol=model.protocol, models=archs, model_kwargs=kwargs,
            runs=runs, seed=int(model.hparams.seed), device=self.strategy.root_device,
            baselines=list(baselines or []), random_lr=random_lr, full_epochs=full_epochs,
            full_lr=full_lr, full_batch_size=full_batch_size, output=output, config=config)

    def distill(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                output: str | None = None, resume: bool = True) -> Path | None:
        """Distil a synthetic set by matching the experts' trajectories.

        Args:
            model: a :class:`~lightning_distill.DistillationModule`.
            datamodule: the real data (a :class:`~lightning_distill.RealDataModule`).
            output: the run's directory; the CLI puts there what the config leaves
                unset: ``synthetic.pt`` (the module's ``export_path``), ``checkpoints/``
                (IterationCheckpoint), ``best.pt`` (PeriodicEvaluation), the TensorBoard
                logs and config.yaml in ``logs/``.
            resume: skip a finished set, resume the IterationCheckpoint's ``last.ckpt``.
        """
        from .modules.distill import DistillationModule
        from .stages.distill import fit_distillation

        if not isinstance(model, DistillationModule):
            raise TypeError(f"distill needs a DistillationModule, got {type(model).__name__}")
        return fit_distillation(self, model, datamodule, resume=resume)


def _native_classes(subcommand: str | None) -> tuple[type | None, type | None]:
    """(model class, datamodule class) of a LightningCLI subcommand; (None, None) is
    subclass mode (any module: ``--model CLASS``), Lightning's fit / validate / test."""
    if subcommand == "experts":
        from .data.datamodule import RealDataModule
        from .modules.expert import ExpertTrajectoryModule

        return ExpertTrajectoryModule, RealDataModule
    if subcommand == "distill":
        from .data.datamodule import RealDataModule
        from .modules.distill import DistillationModule

        return DistillationModule, RealDataModule
    if subcommand == "evaluate":
        from .data.datamodule import RealDataModule
        from .modules.evaluate import EvalModule

        return EvalModule, RealDataModule
    return None, None


#: Trainer defaults per subcommand (a config or the command line overrides them)
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    # the module stops itself after its iterations; an iteration takes seconds: log each
    "distill": {"max_epochs": -1, "log_every_n_steps": 1},
    # the store is what an expert leaves: no per-expert ModelCheckpoint
    "experts": {"enable_checkpointing": False},
}

#: subcommands run by :class:`LightningDistillCLI`
LIGHTNING_SUBCOMMANDS = ("experts", "distill", "evaluate", "fit", "validate", "test")


def _subcommand(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


class LightningDistillCLI(LightningCLI):
    """``lightning-distill`` as a LightningCLI: the ``experts`` subcommand (model
    ExpertTrajectoryModule) and the ``distill`` subcommand (model DistillationModule),
    both with data RealDataModule and no ``class_path`` needed (the subcommand named on
    the command line picks the classes before the parser is built), and Lightning's
    ``fit`` / ``validate`` / ``test`` for any module (``--model CLASS``).

    Embedding: ``LightningDistillCLI(args=["distill", "--config", "digits/ipc10"])``
    runs it; ``run=False`` only parses and instantiates (``cli.model``,
    ``cli.datamodule``, ``cli.trainer``).
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.requested = _subcommand(argv)
        model_class, data_class = _native_classes(self.requested)
        kwargs.setdefault("trainer_class", DistillTrainer)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS.get(self.requested, {})))
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs.setdefault("prog", "lightning-distill")
        # no abbreviated options: `--trainer.max_epoch` is a typo, not `max_epochs`
        parser_kwargs.setdefault("allow_abbrev", False)
        for sub in self.subcommands():
            parser_kwargs.setdefault(sub, {}).setdefault("allow_abbrev", False)
        if model_class is not None and data_class is not None:
            # subclass mode lists `--model` / `--data` as one option each: say where the
            # classes' own arguments are listed
            parser_kwargs[self.requested].setdefault("epilog", (
                f"The model's arguments: lightning-distill {self.requested} --model.help "
                f"{model_class.__name__}; the data's: lightning-distill {self.requested} "
                f"--data.help {data_class.__name__} (a subclass: --model.class_path "
                f"my.Module, then its arguments)."))
        parser_kwargs.setdefault("description",
                                 "Dataset distillation by trajectory matching (MTT, FTD, DATM).")
        with warnings.catch_warnings():
            # argv is sys.argv resolved (recipe names, the default recipe): passing it as
            # args is what LightningCLI warns about when sys.argv is set too
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            # subclass mode everywhere: under experts / distill / evaluate the default
            # class_path is the subcommand's own class, so a recipe gives plain init
            # arguments and `--model.class_path my.SubClass` swaps in a subclass
            super().__init__(model_class, data_class, subclass_mode_model=True,
                             subclass_mode_data=True, args=argv,
                             parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        model_class, data_class = _native_classes(self.requested)
        defaults = {key: {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
                    for key, cls in (("model", model_class), ("data", data_class))
                    if cls is not None}
        if defaults:
            parser.set_defaults(defaults)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        subs = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        if self.requested in ("experts", "distill", "evaluate"):
            subs[self.requested] = {"model", "datamodule"}
        return subs

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "distill":
            fill_distill_outputs(self.config["distill"])


class _Parsed(Exception):
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParsingCLI(LightningDistillCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.subcommand] if self.subcommand else self.config)


def parse_lightning_config(argv: Sequence[str]) -> Namespace:
    """The configuration a LightningCLI subcommand (``distill``, ``fit``, ...) would run,
    parsed but nothing instantiated (no store opened, no data read): ``--config`` files
    (packaged recipe names too), overrides and defaults merged, as ``--print_config``
    shows it."""
    try:
        _ParsingCLI(args=_prepare_argv(list(argv)))
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("parse_lightning_config: the command line ran instead of parsing")


def _namespace(class_path: str, **init_args: Any) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def init_args(node: Namespace) -> Namespace:
    """The arguments of a class in a parsed config: ``init_args`` of a subclass-mode
    node (``model`` and ``data`` under every subcommand: ``class_path`` + ``init_args``),
    the node itself otherwise (a plain class group)."""
    return node.init_args if node.get("class_path") is not None else node


def fill_distill_outputs(cfg: Namespace) -> None:
    """Put under ``cfg.output`` what the ``distill`` config leaves unset: the module's
    ``export_path`` (``synthetic.pt``), the Trainer's root directory and logger
    (TensorBoard in ``logs/``, where LightningCLI saves config.yaml), IterationCheckpoint's
    ``dirpath`` (``checkpoints/``; one is added when the callbacks have none, so every
    run resumes) and PeriodicEvaluation's ``best_path`` (``best.pt``)."""
    model = init_args(cfg.model)
    out = cfg.get("output")
    if out is None:
        if model.get("export_path") is None:
            raise ConfigError("lightning-distill distill: error: set `output` (the run's "
                              "directory) or `model.export_path` (where the set is written)")
        return
    out = Path(out)
    if model.get("export_path") is None:
        model.export_path = str(out / "synthetic.pt")
    trainer = cfg.trainer
    if trainer.get("default_root_dir") is None:
        trainer.default_root_dir = str(out)
    if trainer.get("logger") in (None, True):
        trainer.logger = _namespace("pytorch_lightning.loggers.TensorBoardLogger",
                                    save_dir=str(out), name="logs", version="",
                                    default_hp_metric=False)
    callbacks = trainer.get("callbacks")
    callbacks = [] if callbacks is None else (
        list(callbacks) if isinstance(callbacks, list) else [callbacks])
    has_checkpoint = False
    for cb in callbacks:
        name = str(cb.get("class_path", "")).rsplit(".", 1)[-1]
        init = cb.get("init_args")
        if init is None:
            cb.init_args = init = Namespace()
        if name == "IterationCheckpoint":
            has_checkpoint = True
            if init.get("dirpath") is None:
                init.dirpath = str(out / "checkpoints")
        elif name == "PeriodicEvaluation" and init.get("best_path") is None:
            init.best_path = str(out / "best.pt")
    if not has_checkpoint:
        callbacks.append(_namespace("lightning_distill.callbacks.IterationCheckpoint",
                                    dirpath=str(out / "checkpoints"), every_n=100))
    bars = [cb for cb in callbacks if str(cb.get("class_path", "")).endswith("ProgressBar")]
    if trainer.get("enable_progress_bar") is not False and not bars:
        callbacks.append(_namespace("pytorch_lightning.callbacks.RichProgressBar", leave=False))
    trainer.callbacks = callbacks


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
    # lightning_fabric logs "Seed set to ..." once per LightningCLI (a run parses each of
    # its sections before starting)
    for name in ("pytorch_lightning", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _OnceFilter) for f in handler.filters):
                handler.addFilter(_OnceFilter())


def _report(name: str | None, err: BaseException) -> int:
    """One line for a user error (exit status 2), unless LIGHTNING_DISTILL_TRACEBACK=1."""
    if os.environ.get("LIGHTNING_DISTILL_TRACEBACK", "") not in ("", "0"):
        raise err
    print(f"lightning-distill {name}: error: {type(err).__name__}: {err}\n"
          "(set LIGHTNING_DISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
    return 2


def _prepare_argv(argv: list[str]) -> list[str]:
    """``argv`` with the default recipe added when it names no ``--config`` (and says so
    on stderr) and every ``--config`` value resolved to a file (:func:`resolve_config`)."""
    recipe = default_recipe(argv)
    if recipe is not None:
        if "--print_config" not in argv:
            print(f"lightning-distill: no --config given: using the packaged recipe {recipe} "
                  f"({RECIPES_DIR / recipe}.yaml)", file=sys.stderr)
        k = next(i for i, a in enumerate(argv) if a in DEFAULT_RECIPES)
        argv[k + 1 : k + 1] = ["--config", recipe]
    argv = _resolve_config_args(argv)
    check_yaml_files(argv)
    return argv


#: top-level keys of a recipe in the format before LightningCLI, per subcommand
OLD_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "distill": ("store", "distill", "window", "ema", "evaluation",
                "checkpoint_every_n_steps", "image_every_n_steps", "seed"),
    "experts": ("experts", "sharpness"),
    "evaluate": ("epochs", "batch_size", "lr", "dsa", "group_size", "device", "seed"),
}


def _init_names(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _unknown_key_error(name: str, file: str, dotted: str, key: str,
                       names: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"lightning-distill {name}: error: {file}: unknown key '{dotted}'{hint}; valid keys "
        f"there: {', '.join(names)}. See `lightning-distill {name} --help`.")


#: top-level keys of a ``run`` recipe in the format before LightningCLI
OLD_RUN_KEYS = ("runs", "model", "sharpness", "data_selection", "checkpoint_every_n_steps",
                "image_every_n_steps")


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b]... = value`` for ``dotted = "a.b..."``; a segment inside a list is an
    index or the ``name`` of an entry (``distill.ipc10.model.iterations``)."""
    node: Any = data
    keys = dotted.split(".")
    for k, key in enumerate(keys):
        last = k == len(keys) - 1
        if isinstance(node, list):
            index = next((i for i, item in enumerate(node)
                          if isinstance(item, dict) and item.get("name") == key), None)
            if index is None and key.isdigit() and int(key) < len(node):
                index = int(key)
            if index is None:
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(f"lightning-distill run: error: --{dotted}: no entry "
                                  f"{key!r} in {'.'.join(keys[:k])} (entries: {names})")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def parse_run(argv: Sequence[str]) -> dict[str, Any]:
    """The run recipe of a ``run`` command line: the ``--config`` files merged in order,
    then every ``--dotted.key value`` (a YAML value) applied. ``--help`` and
    ``--print_config`` print and exit (SystemExit 0), as the other subcommands do."""
    from .stages.pipeline import RUN_KEYS, merge

    args = [a for a in argv if a != "run"]
    if any(a in ("-h", "--help") for a in args):
        print("usage: lightning-distill [options] run [--config FILE|RECIPE ...] "
              "[--KEY.PATH VALUE ...] [--print_config]\n\n"
              "experts -> distill -> evaluate from one recipe (docs/recipes.md, 'run'): "
              "one section per stage in its subcommand's format, merged over the shared "
              "data / trainer; --distill.<name>.model.iterations 100 reaches a "
              "distillation by its name.\n\noptions: "
              + " ".join(f"--{k}" for k in RUN_KEYS))
        raise SystemExit(0)
    recipe: dict[str, Any] = {}
    printing = False
    k = 0
    while k < len(args):
        arg = args[k]
        if arg == "--print_config":
            printing, k = True, k + 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"lightning-distill run: error: unexpected argument {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if k + 1 >= len(args):
                raise ConfigError(f"lightning-distill run: error: --{key} needs a value")
            value, k = args[k + 1], k + 1
        k += 1
        if key == "config":
            value = resolve_config(value)
            data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"lightning-distill run: error: {value}: a run recipe "
                                  "is a mapping")
            old = [x for x in OLD_RUN_KEYS if x in data]
            if old:
                raise ConfigError(
                    f"lightning-distill run: error: {value}: keys {old} are the recipe "
                    "format before LightningCLI; a run recipe now holds one section per "
                    "stage (experts, distill: a list, evaluate), each in its subcommand's "
                    "format. docs/recipes.md, 'From the older recipe format', maps every "
                    "key, and `lightning_distill.stages.migrate.convert_run_recipe` "
                    "converts a file.")
            for bad in data:
                if bad not in RUN_KEYS:
                    raise _unknown_key_error("run", value, bad, bad, RUN_KEYS)
            recipe = merge(recipe, data)
            continue
        top = key.split(".", 1)[0]
        if top not in RUN_KEYS:
            close = difflib.get_close_matches(top, RUN_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"lightning-distill run: error: unknown option --{key}{hint}; "
                              f"the keys of a run recipe: {', '.join(RUN_KEYS)}")
        _set_path(recipe, key, yaml.safe_load(value))
    if printing:
        print(yaml.safe_dump(recipe, sort_keys=False), end="")
        raise SystemExit(0)
    return recipe


def run_command(argv: Sequence[str]) -> int:
    """``lightning-distill run``: parse, check every section, run the stages."""
    from .stages.pipeline import run_pipeline

    recipe = parse_run(argv)

    def check(sub: str, args: Sequence[str]) -> None:
        check_native_config_files(sub, args)
        parse_lightning_config(list(args))

    run_pipeline(recipe, launch=lambda sub, args: LightningDistillCLI(args=list(args)),
                 check=check)
    return 0


def check_native_config_files(name: str, argv: Sequence[str]) -> None:
    """Refuse a ``--config`` file of a LightningCLI subcommand with an unknown key (naming
    the file, the key and a close match: jsonargparse names neither file nor match) or in
    the recipe format before LightningCLI (with what to do)."""
    model_class, data_class = _native_classes(name)
    sections: dict[str, list[str]] = {"trainer": _init_names(pl.Trainer)}
    if model_class is not None:
        sections["model"] = _init_names(model_class)
    if data_class is not None:
        sections["data"] = _init_names(data_class)
    if name == "experts":
        sections["data_selection"] = [f.name for f in dataclasses.fields(DataSelectionConfig)]
    top = ["seed_everything", "model", "data", "trainer", "optimizer", "lr_scheduler",
           *inspect.signature(getattr(DistillTrainer, name)).parameters]
    top = [k for k in dict.fromkeys(top) if k not in ("self", "datamodule")]
    # model / data given another class (subclass mode): its own arguments, not checked here
    swapped = {key for key in ("model", "data") for arg in argv
               if arg in (f"--{key}", f"--{key}.class_path")
               or arg.startswith((f"--{key}=", f"--{key}.class_path="))}
    for file in _config_files(argv, name):
        data: Any = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        old = [k for k in OLD_FORMAT_KEYS.get(name, ()) if k in data]
        if old:
            what = {"distill": "the distillation settings now go under `model:` "
                               "(DistillationModule's arguments: store, ipc, ...), the "
                               "window, EMA and evaluation under `trainer.callbacks:`",
                    "experts": "the expert settings now go under `model:` "
                               "(ExpertTrajectoryModule's arguments), the epochs to "
                               "`trainer.max_epochs`, GSAM under `trainer.callbacks:`",
                    "evaluate": "the protocol (epochs, batch_size, lr, dsa, group_size) "
                                "now goes under `model.protocol:` and the seed under "
                                "`model.seed` (EvalModule's arguments), the device under "
                                "`trainer:`"}[name]
            raise ConfigError(
                f"lightning-distill {name}: error: {file}: keys {old} are the recipe "
                f"format before LightningCLI; {what}. docs/recipes.md, 'From the older "
                f"recipe format', maps every key, and "
                f"`lightning_distill.stages.migrate.convert_{name}_recipe` converts a file.")
        for key, value in data.items():
            if key not in top:
                raise _unknown_key_error(name, file, key, key, top)
            names = sections.get(key)
            if names is None or not isinstance(value, dict):
                continue
            if "class_path" in value:  # subclass form: class_path / init_args
                swapped.add(key)
                continue
            for sub in value:
                if sub not in names:
                    raise _unknown_key_error(name, file, f"{key}.{sub}", sub, names)
    # the command line's `--model.<key>` / `--data.<key>`: in subclass mode jsonargparse
    # reports a misspelt one as a page about Union subtypes; name it with a close match
    for arg in argv:
        head, _, rest = arg[2:].split("=", 1)[0].partition(".") if arg.startswith("--") \
            else ("", "", "")
        if head not in ("model", "data") or head in swapped or not rest:
            continue
        parts = rest.split(".")
        key = parts[1] if parts[0] == "init_args" and len(parts) > 1 else parts[0]
        if key not in ("class_path", "init_args", "help", *sections[head]):
            raise _unknown_key_error(name, "the command line", f"{head}.{key}", key,
                                     sections[head])


def check_yaml_files(argv: Sequence[str]) -> None:
    """Refuse a ``--config`` file that is not valid YAML with its path, line and column."""
    for _, file, _ in _config_values(argv):
        try:
            yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"lightning-distill: error: {file}{where}: not valid YAML: "
                              f"{problem}") from None
        except OSError:
            continue  # a missing file: resolve_config has said so


#: one line per subcommand, for ``lightning-distill --help``
SUBCOMMAND_HELP: dict[str, str] = {
    "experts": "train expert trajectories on real data into a trajectory store",
    "distill": "distil a synthetic set by matching the experts' trajectories",
    "evaluate": "train fresh networks on synthetic sets and report test accuracy",
    "run": "experts -> distill -> evaluate for one recipe, resuming what exists",
    "fit": "Lightning's fit of any LightningModule / datamodule (--model CLASS --data CLASS)",
    "validate": "Lightning's validate of any module",
    "test": "Lightning's test of any module",
}


def _usage() -> str:
    order = ["experts", "distill", "evaluate", "run", "fit", "validate", "test"]
    lines = ["usage: lightning-distill SUBCOMMAND [--config FILE|RECIPE] [--KEY VALUE ...]",
             "", "Dataset distillation by trajectory matching (MTT, FTD, DATM).", "",
             "subcommands (`lightning-distill SUBCOMMAND --help` for its keys):"]
    lines += [f"  {k:<9} {SUBCOMMAND_HELP[k]}" for k in order]
    lines += ["", f"packaged recipes (--config NAME): {', '.join(packaged_recipes())}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _subcommand(argv)
    if name is None or name not in SUBCOMMAND_HELP:
        asked = any(a in ("-h", "--help") for a in argv)
        close = difflib.get_close_matches(str(name), SUBCOMMAND_HELP, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(_usage() if asked or name is None else
              f"lightning-distill: error: unknown subcommand {name!r}{hint}\n\n{_usage()}",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    _quiet_repeated_lightning_info()
    try:
        argv = _prepare_argv(argv)
        if name == "run":
            return run_command(argv)
        if name in OLD_FORMAT_KEYS:
            check_native_config_files(name, argv)
        LightningDistillCLI(args=argv)
        return 0
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except USER_ERRORS as err:  # raised while a subcommand runs
        return _report(name, err)


if __name__ == "__main__":
    raise SystemExit(main())
