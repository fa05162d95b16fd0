"""`lightning-distill run`: experts -> distill -> evaluate for one recipe.

Every stage resumes from what is already on disk: experts present in the store are
not retrained, a finished synthetic set is not distilled again (an unfinished one
resumes from its last checkpoint), and the evaluation reruns only the networks (cheap).
Files go under ``workdir``: ``experts/``, ``<run name>/synthetic.pt``, ``results.json``.
Under DDP (``trainer.strategy: ddp``) every rank trains and distils; global rank 0 alone
evaluates and writes the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

from ..config import DataConfig, ModelConfig, TrainerConfig
from ._common import console
from .distill import (
    DistillConfig,
    DistillSettings,
    EMAConfig,
    PeriodicEvalConfig,
    WindowConfig,
    distill,
)
from .evaluate import EvaluateConfig, evaluate
from .experts import (
    DataSelectionConfig,
    ExpertsConfig,
    ExpertTrainingConfig,
    SharpnessConfig,
    train_experts,
)


@dataclass
class DistillRun:
    """One synthetic set to distil from the shared experts (e.g. one ipc)."""

    name: str = "ipc10"
    distill: DistillSettings = field(default_factory=DistillSettings)
    window: WindowConfig = field(default_factory=WindowConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    evaluation: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)


@dataclass
class RunConfig:
    """A whole recipe: shared data/model/trainer, the experts, the distillation runs and
    the evaluation (whose ``data`` and ``synthetic`` are filled in by the pipeline)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    workdir: str = "outputs/digits"
    seed: int = 0
    experts: ExpertTrainingConfig = field(default_factory=ExpertTrainingConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    data_selection: DataSelectionConfig = field(default_factory=DataSelectionConfig)
    runs: list[DistillRun] = field(default_factory=lambda: [DistillRun()])
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checkpoint_every_n_steps: int = 100
    image_every_n_steps: int = 100


def run(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run the whole pipeline of ``cfg``; returns the evaluation table rows."""
    work = Path(cfg.workdir)
    store = str(work / "experts")
    console.rule("[bold]1/3 experts")
    train_experts(ExpertsConfig(
        data=cfg.data, model=cfg.model, experts=cfg.experts, sharpness=cfg.sharpness,
        trainer=cfg.trainer, store=store, log_dir=str(work / "logs"), seed=cfg.seed,
        data_selection=cfg.data_selection))
    synthetic = []
    for r in cfg.runs:
        console.rule(f"[bold]2/3 distill {r.name}")
        final = distill(DistillConfig(
            data=cfg.data, store=store, output=str(work / r.name), distill=r.distill,
            window=r.window, ema=r.ema, evaluation=r.evaluation, trainer=cfg.trainer,
            seed=cfg.seed, checkpoint_every_n_steps=cfg.checkpoint_every_n_steps,
            image_every_n_steps=cfg.image_every_n_steps))
        # With periodic evaluation on, the set chosen on the validation split is the one
        # reported (never a choice made on the test set).
        best = final.parent / "best.pt"
        synthetic.append(str(best if r.evaluation.every_n_steps > 0 and best.exists() else final))
    if rank_zero_only.rank != 0:
        # under DDP every rank runs this function (Lightning's launcher re-runs the
        # command); the evaluation is plain loops, so rank 0 alone does it
        return []
    console.rule("[bold]3/3 evaluate")
    ev = cfg.evaluate
    ev.data = cfg.data
    ev.synthetic = synthetic
    ev.seed = cfg.seed
    # the baselines train the experts' architecture too
    ev.model_kwargs = {cfg.model.name: dict(cfg.model.kwargs), **ev.model_kwargs}
    if ev.output is None:
        ev.output = str(work / "results.json")
    return evaluate(ev)
