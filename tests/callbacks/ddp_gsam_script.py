"""Two-process CPU DDP run of the GSAM callback, launched by tests/callbacks/test_sharpness.py.

Usage: ``python tests/callbacks/ddp_gsam_script.py OUTDIR``. Lightning's subprocess
launcher re-runs this script once per extra rank with LOCAL_RANK etc. in the environment,
hence the ``__main__`` guard. Each rank trains on its own (rank-dependent) data without a
distributed sampler and saves its initial and final flat parameters to
``OUTDIR/rank{r}.pt``. The data and model definitions are imported by the test for its
single-process hand simulation.
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STEPS = 3
BATCH = 6
RHO = 0.05
ALPHA = 0.3
LR = 0.1
WORLD_SIZE = 2


def make_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-dependent data: STEPS batches of BATCH samples, 3 features, 2 classes."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(STEPS * BATCH, 3, generator=gen)
    y = torch.randint(0, 2, (STEPS * BATCH,), generator=gen)
    return x, y


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.loss_closure = lambda: F.cross_entropy(self(x), y)
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        x, y = make_data(self.global_rank)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def main(outdir: str) -> None:
    from lightning_distill.callbacks.sharpness import GSAM

    module = TinyModule()
    init = flat(module)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=WORLD_SIZE,
        max_steps=STEPS,
        callbacks=[GSAM(rho=RHO, alpha=ALPHA)],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    torch.save(
        {
            "init": init,
            "final": flat(module),
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
        },
        os.path.join(outdir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
