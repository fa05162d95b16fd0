"""`lightning-distill distill`: distil a synthetic set from a trajectory store.

The stage is one ``Trainer.fit`` of a :class:`DistillationModule` with its callbacks.
:func:`fill_distill_outputs` puts under the config's ``output`` what it leaves unset:
``synthetic.pt`` (+ ``synthetic.png``; ``synthetic_ema.pt`` with EMA),
``checkpoints/last.ckpt`` (IterationCheckpoint, atomically), ``best.pt``
(PeriodicEvaluation) and TensorBoard logs in ``logs/``. :func:`fit_distillation`
resumes: re-running the same command resumes from ``checkpoints/last.ckpt``, a finished
run is not repeated, and a finished run rerun with a larger ``iterations`` continues
from its checkpoint.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace

from ..callbacks.iteration_checkpoint import IterationCheckpoint
from ..errors import ConfigError
from ..modules.distill import DistillationModule
from ._common import console


def set_is_finished(path: str | Path, iterations: int) -> bool:
    """True if the synthetic set at ``path`` exists and holds ``iterations`` iterations."""
    path = Path(path)
    if not path.exists():
        return False
    from ..data.synthetic import SyntheticSet

    return int(SyntheticSet.load(path).meta.get("iteration", -1)) >= iterations


def fit_distillation(trainer: pl.Trainer, module: DistillationModule, datamodule=None, *,
                     resume: bool = True) -> Path | None:
    """Fit ``module`` on ``trainer``, resuming what exists: a set at the module's
    ``export_path`` that holds all iterations is not distilled again, and the
    ``last.ckpt`` of the trainer's :class:`IterationCheckpoint` (when there is one and
    the file exists) is resumed. The Trainer should have ``max_epochs=-1``: the module
    stops itself after its iterations, so a run stopped early (``max_time``, a signal)
    and a finished run extended with more iterations both go on from the checkpoint.
    Returns the set's path (None when the module exports nothing)."""
    export = module.hparams.export_path
    if resume and export and set_is_finished(export, module.hparams.iterations):
        console.print(f"[green]{export} is complete; skipping distillation[/]")
        return Path(export)
    ckpts = [c for c in trainer.callbacks if isinstance(c, IterationCheckpoint)]
    ckpt_path = None
    if resume and ckpts and ckpts[0].resolve(trainer).exists():
        ckpt_path = str(ckpts[0].last)
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        console.print(f"Resuming from {ckpt_path} (iteration "
                      f"{int(saved['state_dict']['iteration'])})")
        del saved
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the datamodule's validation split is PeriodicEvaluation's, not a val loop's
        warnings.filterwarnings("ignore", message=".*`val_dataloader` but have no "
                                                  "`validation_step`")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        _summary(trainer, module, time.perf_counter() - start)
    return Path(export) if export else None


def _summary(trainer: pl.Trainer, module: DistillationModule, seconds: float) -> None:
    """What the run wrote, where, and how long it took."""
    from ..callbacks.evaluation import PeriodicEvaluation

    it, skipped = int(module.iteration), int(module.skipped)
    lines = [f"{module.hparams.export_path or 'no export_path'}: {it} iterations "
             f"({skipped} skipped), syn_lr {float(module.syn_lr.detach()):.3g}"]
    for cb in trainer.callbacks:
        if isinstance(cb, PeriodicEvaluation) and cb.best_accuracy is not None:
            lines.append(f"best on the validation split: {cb.best_path or '(not saved)'}, "
                         f"{100 * cb.best_accuracy:.1f} +- {100 * (cb.best_std or 0):.1f} % at "
                         f"iteration {cb.best_step} ({cb.best_source})")
        elif isinstance(cb, IterationCheckpoint) and cb.dirpath is not None:
            lines.append(f"checkpoint: {cb.last}")
    console.print(f"[green]distillation finished in {seconds / 60:.1f} min[/]")
    for line in lines:
        console.print(f"  {line}")


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
            raise ConfigError("distill: set `output` (the run's directory) or "
                              "`model.export_path` (where the set is written)")
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
        callbacks.append(_namespace("lightning_distill.callbacks.IterationProgressBar",
                                    leave=False))
    trainer.callbacks = callbacks
