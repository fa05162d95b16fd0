"""Two-process CPU DDP run of ``train_experts``, launched by tests/stages/test_experts_stage.py.

Usage: ``python tests/stages/ddp_experts_script.py OUTDIR [GROUP_SIZE]``. Lightning's subprocess
launcher re-runs this script for rank 1 at the first ``fit`` (hence the ``__main__``
guard), and both ranks then walk the same list of experts. A callback added here (not
in the library) saves every rank's final flat parameters of each expert to
``OUTDIR/rank{r}_expert{i}.pt``; the store goes to ``OUTDIR/store``.
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        if hasattr(net, "flat_members"):  # a group: this expert's member
            final = net.flat_members()[pl_module.expert_indices.index(self.index)]
        else:
            final = flatten_parameters(net)
        torch.save(
            {"final": final.detach().clone(),
             "world_size": trainer.world_size, "global_step": trainer.global_step},
            self.outdir / f"rank{trainer.global_rank}_expert{self.index}.pt",
        )


def main(outdir: str, group_size: int = 1) -> None:
    out = Path(outdir)
    cfg = ExpertsConfig(
        data=DataConfig(name="digits", batch_size=128),
        model=ModelConfig("ConvNet", {"width": 8, "depth": 2}),
        experts=ExpertTrainingConfig(num_experts=NUM_EXPERTS, epochs=EPOCHS,
                                     group_size=group_size),
        sharpness=SharpnessConfig("gsam", rho=0.05, alpha=0.3),
        trainer=TrainerConfig(accelerator="cpu", devices=2, strategy="ddp",
                              enable_progress_bar=False),
        store=str(out / "store"),
        log_dir=str(out / "logs"),
        seed=0,
    )
    train_experts(cfg, callbacks=lambda i: [SaveFinalParameters(out, i)])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    (out / f"done_rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
