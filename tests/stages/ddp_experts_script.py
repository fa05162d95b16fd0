"""Two-process CPU DDP run of ``train_experts``, launched by tests/stages/test_experts_stage.py.

Usage: ``python tests/stages/ddp_experts_script.py OUTDIR [GROUP_SIZE] [pad]``. Lightning's
subprocess launcher re-runs this script for rank 1 at the first ``fit`` (hence the ``__main__``
guard), and both ranks then walk the same list of experts. A callback added here (not
in the library) saves every rank's final flat parameters of each expert to
``OUTDIR/rank{r}_expert{i}.pt``, with its step losses and the last logged
``train/loss_epoch``; the store goes to ``OUTDIR/store``. With ``pad``, the
experts train with PAD's data selection, and the file also holds the training-set rows
(the first pixel carries the row index, see ``IndexPixel``) every rank saw per epoch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_distill.config import DataConfig, ModelConfig, TrainerConfig
from lightning_distill.models.params import flatten_parameters
from lightning_distill.stages.experts import (
    DataSelectionConfig,
    ExpertsConfig,
    ExpertTrainingConfig,
    SharpnessConfig,
    train_experts,
)

NUM_EXPERTS = 2
EPOCHS = 2


class SaveFinalParameters(Callback):
    """Every rank saves the expert network's final flat parameters."""

    def __init__(self, outdir: Path, index: int) -> None:
        self.outdir, self.index = outdir, index
        self.rows: dict[int, list[int]] = {}
        self.losses: dict[int, list[tuple[float, int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = batch[0][:, 0, 0, 0].round().long().tolist()
        self.rows.setdefault(trainer.current_epoch, []).extend(rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # this rank's step loss (a group returns the members' sum: their mean is logged)
        # and its batch size, for the epoch mean over both ranks
        group = hasattr(pl_module.net, "flat_members")
        members = len(pl_module.expert_indices) if group else 1
        size = batch[1].shape[-1]
        self.losses.setdefault(trainer.current_epoch, []).append(
            (float(outputs["loss"]) / members, size))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        if hasattr(net, "flat_members"):  # a group: this expert's member
            final = net.flat_members()[pl_module.expert_indices.index(self.index)]
        else:
            final = flatten_parameters(net)
        torch.save(
            {"final": final.detach().clone(),
             "world_size": trainer.world_size, "global_step": trainer.global_step,
             "rows": self.rows, "losses": self.losses,
             "loss_epoch": float(trainer.callback_metrics["train/loss_epoch"])},
            self.outdir / f"rank{trainer.global_rank}_expert{self.index}.pt",
        )


def index_pixel(monkeypatch_target) -> None:
    """Write each training image's row index into its first pixel once the datamodule is set
    up (DSA off), so the batches name the rows they hold."""
    original = monkeypatch_target.setup

    def setup(self, stage=None):
        fresh = self.real is None
        original(self, stage)
        if fresh:
            x, _ = self.train_set.tensors
            x[:, 0, 0, 0] = torch.arange(x.shape[0], dtype=x.dtype)

    monkeypatch_target.setup = setup


def main(outdir: str, group_size: int = 1, pad: bool = False) -> None:
    out = Path(outdir)
    extra = {}
    if pad:
        from lightning_distill.data.datamodule import RealDataModule

        index_pixel(RealDataModule)
        # 2 epochs: half of each class (easiest first) at epoch 0, all of them at epoch 1
        extra = dict(data_selection=DataSelectionConfig(
            enabled=True, num_models=1, score_epochs=1, initial_ratio=0.5, add_end_epoch=1,
            remove_epochs=[1, 1], remove_ratios=[0.25, 0.25]))
    cfg = ExpertsConfig(
        data=DataConfig(name="digits", batch_size=128),
        model=ModelConfig("ConvNet", {"width": 8, "depth": 2}),
        experts=ExpertTrainingConfig(num_experts=NUM_EXPERTS, epochs=EPOCHS,
                                     group_size=group_size, dsa=not pad),
        sharpness=SharpnessConfig("gsam", rho=0.05, alpha=0.3),
        trainer=TrainerConfig(accelerator="cpu", devices=2, strategy="ddp",
                              enable_progress_bar=False),
        store=str(out / "store"),
        log_dir=str(out / "logs"),
        seed=0,
        **extra,
    )
    train_experts(cfg, callbacks=lambda i: [SaveFinalParameters(out, i)])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    (out / f"done_rank{rank}").write_text("ok")


if __name__ == "__main__":
    args = sys.argv[2:]
    sizes = [int(a) for a in args if a.isdigit()]
    main(sys.argv[1], sizes[0] if sizes else 1, pad="pad" in args)
