"""`lightning-distill distill`: distil a synthetic set from a trajectory store.

Writes, under ``output``: ``synthetic.pt`` (+ ``synthetic.png``; ``synthetic_ema.pt``
with EMA), ``checkpoints/last.ckpt`` every ``checkpoint_every_n_steps`` iterations
(atomically) and TensorBoard logs in ``logs/``. Re-running the same command resumes
from ``checkpoints/last.ckpt``; a finished run is not repeated, and a finished run rerun
with a larger ``distill.iterations`` continues from its checkpoint.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from ..callbacks.ema import SyntheticEMA
from ..callbacks.images import SyntheticImageLogger
from ..callbacks.iteration_checkpoint import IterationCheckpoint
from ..callbacks.matching_window import MatchingWindow
from ..config import DataConfig, TrainerConfig, build_datamodule
from ..data.augment import DEFAULT_DSA_STRATEGY, dsa_flip_for
from ..modules.distill import DistillationModule
from ._common import console, make_callbacks


@dataclass
class DistillSettings:
    """Matching hyperparameters, named as DATM's configurations name them (docs/recipes.md)."""

    ipc: int = 10
    iterations: int = 1000
    syn_steps: int = 20
    expert_epochs: int = 2
    batch_syn: int | None = None
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_y: float = 2.0
    lr_teacher: float = 0.01
    image_init: str = "real"
    label_init: str = "hard"
    learn_labels: bool = False
    label_experts: int | None = None
    init_expert: int = 0
    threshold: float | None = None
    mode: str = "full"
    match: str = "last"
    param_mask: list[str] | None = None
    param_drop_ratio: float = 0.0
    dsa: bool = True
    dsa_strategy: str = DEFAULT_DSA_STRATEGY
    syn_lr_min: float = 1e-6
    syn_lr_max: float = 10.0
    max_nonfinite: int = 10


@dataclass
class WindowConfig:
    """The start-epoch window T-, T, T+ and sequential generation (DATM; docs/method.md,
    section 'Matching window')."""

    min_start_epoch: int = 0
    current_max_start_epoch: int | None = None
    max_start_epoch: int = 20
    expansion_end: int | None = None
    sequential: bool = False


@dataclass
class EMAConfig:
    """FTD's EMA of the synthetic images (docs/method.md, 'EMA of the synthetic images')."""

    enabled: bool = False
    decay: float = 0.999
    bias_correction: bool = False


@dataclass
class PeriodicEvalConfig:
    """Validation-split evaluation during distillation (0 steps: off); ``group_size``
    runs train together as one vectorised model."""

    every_n_steps: int = 0
    model: str = "ConvNet"
    runs: int = 1
    epochs: int = 300
    batch_size: int = 256
    group_size: int | None = None


@dataclass
class DistillConfig:
    """Everything ``lightning-distill distill`` needs; the keys of ``ipc<N>.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    store: str = "outputs/digits/experts"
    output: str = "outputs/digits/ipc10"
    distill: DistillSettings = field(default_factory=DistillSettings)
    window: WindowConfig = field(default_factory=WindowConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    evaluation: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    checkpoint_every_n_steps: int = 100
    image_every_n_steps: int = 100
    resume: bool = True


def build_module(cfg: DistillConfig) -> DistillationModule:
    d = cfg.distill
    return DistillationModule(
        cfg.store, d.ipc, iterations=d.iterations, syn_steps=d.syn_steps,
        expert_epochs=d.expert_epochs, max_start_epoch=cfg.window.max_start_epoch,
        batch_syn=d.batch_syn, lr_img=d.lr_img, lr_lr=d.lr_lr, lr_y=d.lr_y,
        lr_teacher=d.lr_teacher, image_init=d.image_init, label_init=d.label_init,
        learn_labels=d.learn_labels, label_experts=d.label_experts,
        init_expert=d.init_expert, threshold=d.threshold, mode=d.mode, match=d.match,
        param_mask=d.param_mask, param_drop_ratio=d.param_drop_ratio,
        dsa=d.dsa, dsa_strategy=d.dsa_strategy,
        dsa_flip=dsa_flip_for(cfg.data.name), max_nonfinite=d.max_nonfinite,
        syn_lr_min=d.syn_lr_min, syn_lr_max=d.syn_lr_max, seed=cfg.seed,
        export_path=str(Path(cfg.output) / "synthetic.pt"),
    )


def build_callbacks(cfg: DistillConfig) -> list[Callback]:
    """The stage's callbacks; PeriodicEvaluation takes the validation split, the image
    transform and the experts' architecture from the fit (``trainer.datamodule`` and the
    module's store) in its ``setup``."""
    w = cfg.window
    callbacks: list[Callback] = [
        MatchingWindow(w.min_start_epoch, w.current_max_start_epoch, w.max_start_epoch,
                       w.expansion_end, w.sequential),
        SyntheticImageLogger(every_n_steps=cfg.image_every_n_steps),
    ]
    if cfg.ema.enabled:
        callbacks.append(SyntheticEMA(cfg.ema.decay, cfg.ema.bias_correction))
    ev = cfg.evaluation
    if ev.every_n_steps > 0:
        from ..callbacks.evaluation import PeriodicEvaluation

        callbacks.append(PeriodicEvaluation(
            every_n_steps=ev.every_n_steps, model=ev.model, runs=ev.runs,
            epochs=ev.epochs, batch_size=ev.batch_size, group_size=ev.group_size, seed=cfg.seed,
            best_path=str(Path(cfg.output) / "best.pt")))
    callbacks.append(IterationCheckpoint(Path(cfg.output) / "checkpoints",
                                         cfg.checkpoint_every_n_steps))
    return callbacks


def set_is_finished(path: str | Path, iterations: int) -> bool:
    """True if the synthetic set at ``path`` exists and holds ``iterations`` iterations."""
    path = Path(path)
    if not path.exists():
        return False
    from ..data.synthetic import SyntheticSet

    return int(SyntheticSet.load(path).meta.get("iteration", -1)) >= iterations


def is_finished(cfg: DistillConfig) -> bool:
    """True if ``output/synthetic.pt`` exists and holds all iterations."""
    return set_is_finished(Path(cfg.output) / "synthetic.pt", cfg.distill.iterations)


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


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) the distillation of ``cfg``; returns the synthetic set's path."""
    out = Path(cfg.output)
    if cfg.resume and is_finished(cfg):
        console.print(f"[green]{out / 'synthetic.pt'} is complete; skipping distillation[/]")
        return out / "synthetic.pt"
    pl.seed_everything(cfg.seed, verbose=False)
    # Lightning prepares and sets up the data module; the module initialises itself from
    # its training part in on_fit_start (not on a resume: the checkpoint has the set)
    trainer = pl.Trainer(
        max_epochs=-1,  # the module stops itself after its iterations
        callbacks=make_callbacks(cfg.trainer.enable_progress_bar, build_callbacks(cfg)),
        logger=TensorBoardLogger(str(out), name="logs", version="", default_hp_metric=False),
        **cfg.trainer.kwargs(log_every_n_steps=1),
    )
    fit_distillation(trainer, build_module(cfg), build_datamodule(cfg.data), resume=cfg.resume)
    return out / "synthetic.pt"
