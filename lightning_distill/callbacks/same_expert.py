"""SameExpertOnAllRanks: the guard of data-parallel expert training.

``lightning-distill experts`` under DDP loops over one ``fit`` per expert, and every rank
computes the list of missing experts on its own (from the store directory). If the
ranks' lists differ (a store directory that is not shared between nodes), the ranks
would train different experts and wait for each other forever; this callback compares
the plans in ``setup`` and fails on every rank at once.

Example::

    trainer = pl.Trainer(strategy="ddp", devices=2,
                         callbacks=[SameExpertOnAllRanks(index=3, todo=[4, 5])])
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ..errors import StateError

__all__ = ["SameExpertOnAllRanks"]


class SameExpertOnAllRanks(Callback):
    """Under DDP, fail on every rank at once if the ranks disagree on the expert to train
    or on the experts still missing (e.g. a store directory not shared between nodes).

    Args:
        index: the expert this rank is about to train, or the members of the group.
        todo: the experts this rank will train after it.
    """

    def __init__(self, index: int | Sequence[int], todo: Sequence[int]) -> None:
        # one expert: [index, remaining...]; a group: [members..., -1, remaining...]
        current = [int(index)] if isinstance(index, int) else [*map(int, index), -1]
        self.plan = [*current, *map(int, todo)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size <= 1:
            return
        reference = trainer.strategy.broadcast(self.plan, src=0)
        agree = trainer.strategy.reduce_boolean_decision(reference == self.plan, all=True)
        if not agree:
            raise StateError(
                f"lightning-distill experts: the {trainer.world_size} ranks disagree on the "
                f"experts to train (rank {trainer.global_rank}: {self.plan[:8]}, rank 0: "
                f"{reference[:8]}; [current, (-1,) remaining...]). Every rank must see the same "
                "store directory: put it on a file system shared by all nodes."
            )
