"""Two-process CPU DDP run of ``train_experts``, launched by tests/stages/test_experts_stage.py.

Usage: ``python tests/stages/ddp_experts_script.py OUTDIR [GROUP_SIZE] [pad] [prepared]``.
Lightning's subprocess launcher re-runs this script for rank 1 at the first ``fit`` (hence
the ``__main__`` guard), and both ranks then walk the same list of experts. A callback
added here (not in the library) saves every rank's final flat parameters of each expert to
``OUTDIR/rank{r}_expert{i}.pt``, with its step losses and the last logged
``train/loss_epoch``; the store goes to ``OUTDIR/store``. With ``pad``, the
experts train with PAD's data selection, and the file also holds the training-set rows
(the first pixel carries the row index, see ``IndexPixel``) every rank saw per epoch.
With ``prepared``, the data are read from their prepared form (memory-mapped, under
``OUTDIR/prepared``) as streamed splits, and the file holds how many training rows the
rank read while the expert trained.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_distill.callbacks import GSAM, PADDataSelection
from lightning_distill.callbacks.trajectory import TrajectoryRecorder
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.models.params import flatten_parameters
from lightning_distill.modules.expert import ExpertTrajectoryModule
from lightning_distill.stages.experts import train_experts

NUM_EXPERTS = 2
EPOCHS = 2


class SaveFinalParameters(Callback):
    """Every rank saves the final flat parameters of each expert it trained (a copy of
    this callback goes to every expert's Trainer: the experts come from the module, a
    group's, or the TrajectoryRecorder, one at a time)."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.rows: dict[int, list[int]] = {}
        self.losses: dict[int, list[tuple[float, int]]] = {}
        self.rows_at_start = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.rows_at_start = _rows_read(trainer)

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
        if hasattr(net, "flat_members"):  # a group: one file per member
            finals = dict(zip(pl_module.expert_indices, net.flat_members(), strict=True))
        else:
            (index,) = [cb.expert_index for cb in trainer.callbacks
                        if isinstance(cb, TrajectoryRecorder)]
            finals = {index: flatten_parameters(net)}
        for index, final in finals.items():
            torch.save(
                {"final": final.detach().clone(),
                 "world_size": trainer.world_size, "global_step": trainer.global_step,
                 "rows": self.rows, "losses": self.losses,
                 "rows_read": _rows_read(trainer) - self.rows_at_start,
                 "train_size": len(getattr(trainer.datamodule, "train_set", None) or ()),
                 "loss_epoch": float(trainer.callback_metrics["train/loss_epoch"])},
                self.outdir / f"rank{trainer.global_rank}_expert{index}.pt",
            )


def _rows_read(trainer: pl.Trainer) -> int:
    """Training rows a streamed split has read so far (0: held, or a group's Trainer,
    which gets its member loaders without the datamodule)."""
    split = getattr(getattr(trainer, "datamodule", None), "train_set", None)
    return int(getattr(split, "rows_read", 0))


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


def main(outdir: str, group_size: int = 1, pad: bool = False, prepared: bool = False) -> None:
    out = Path(outdir)
    callbacks: list[Callback] = [GSAM(rho=0.05, alpha=0.3), SaveFinalParameters(out)]
    if pad:
        index_pixel(RealDataModule)
        # 2 epochs: half of each class (easiest first) at epoch 0, all of them at epoch 1
        callbacks.append(PADDataSelection(
            num_models=1, score_epochs=1, initial_ratio=0.5, add_end_epoch=1,
            remove_epochs=[1, 1], remove_ratios=[0.25, 0.25]))
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 8, "depth": 2},
                                   dsa=not pad)
    trainer_kwargs = dict(accelerator="cpu", devices=2, strategy="ddp",
                          enable_progress_bar=False, max_epochs=EPOCHS, callbacks=callbacks)
    data = dict(prepared=True, prepared_root=str(out / "prepared"), hold=False) \
        if prepared else {}
    train_experts(model, RealDataModule("digits", batch_size=128, **data), trainer_kwargs,
                  store=str(out / "store"), log_dir=str(out / "logs"),
                  num_experts=NUM_EXPERTS, group_size=group_size, seed=0)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    (out / f"done_rank{rank}").write_text("ok")


if __name__ == "__main__":
    args = sys.argv[2:]
    sizes = [int(a) for a in args if a.isdigit()]
    main(sys.argv[1], sizes[0] if sizes else 1, pad="pad" in args, prepared="prepared" in args)
