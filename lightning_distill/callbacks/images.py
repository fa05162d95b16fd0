"""SyntheticImageLogger: synthetic image grids in TensorBoard.

Every ``every_n_steps`` outer iterations (and at the end of training) the synthetic
images, one row per class, each enlarged by nearest neighbour to at least
``min_image_side`` pixels a side (64 by default), go to the logger as an image grid at
the step of the iteration that produced them, mapped back to pixels
by ``pl_module.to_pixels`` (de-normalisation or inverse ZCA, set by the distill stage
from :meth:`RealDataModule.from_input_space`) or, without it, by per-image min-max
scaling. Every logger whose ``experiment`` has ``add_image`` (TensorBoard) gets them; the
others (CSV, none) are skipped.

Example::

    trainer = pl.Trainer(callbacks=[SyntheticImageLogger(every_n_steps=100)],
                         logger=TensorBoardLogger("runs", default_hp_metric=False))
"""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ..data.synthetic import GRID_MIN_IMAGE_SIDE, class_grid

__all__ = ["SyntheticImageLogger", "class_grid"]


class SyntheticImageLogger(Callback):
    """Log grids of the synthetic (and EMA) images every ``every_n_steps`` iterations."""

    def __init__(self, every_n_steps: int = 100, max_per_class: int = 10,
                 min_image_side: int = GRID_MIN_IMAGE_SIDE) -> None:
        self.every_n_steps = int(every_n_steps)
        self.max_per_class = int(max_per_class)
        self.min_image_side = int(min_image_side)
        self._logged: int | None = None  # the iteration last logged

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        iteration = int(pl_module.iteration)
        if not trainer.is_global_zero or iteration == self._logged:
            return  # (the end of training right after a periodic grid: logged once)
        self._logged = iteration
        experiments = [e for e in (getattr(lg, "experiment", None) for lg in trainer.loggers)
                       if hasattr(e, "add_image")]
        if not experiments:
            return
        # the set after k iterations is logged at step k - 1, the iteration that made it
        # (docs/design.md, 'Steps are iterations')
        step = max(0, iteration - 1)
        to_pixels = getattr(pl_module, "to_pixels", None)
        class_ids = pl_module.class_ids()
        grid = functools.partial(class_grid, class_ids=class_ids, to_pixels=to_pixels,
                                 max_per_class=self.max_per_class,
                                 min_image_side=self.min_image_side)
        images = {"synthetic/images": grid(pl_module.images)}
        ema = getattr(pl_module, "synthetic_ema", None)
        if ema is not None and ema.initial is not None:
            images["synthetic/ema_images"] = grid(ema.average)
        for experiment in experiments:
            for tag, image in images.items():
                experiment.add_image(tag, image, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps > 0 and int(pl_module.iteration) % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)
