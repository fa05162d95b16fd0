"""SyntheticImageLogger and class_grid: one row per class, TensorBoard image events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_distill.callbacks.ema import SyntheticEMA
from lightning_distill.callbacks.images import SyntheticImageLogger, class_grid
from lightning_distill.modules.distill import DistillationModule
from tests.helpers import build_tiny_store, quiet_trainer, tiny_data


def _cell(grid: torch.Tensor, row: int, col: int, h: int, w: int, pad: int = 1) -> torch.Tensor:
    top, left = pad + row * (h + pad), pad + col * (w + pad)
    return grid[:, top:top + h, left:left + w]


def test_class_grid_layout_one_row_per_class():
    # 3 classes, 2 images each, 1 x 4 x 5 pixels already in [0, 1]; class c image j = value
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    vals = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    images = vals.view(-1, 1, 1, 1).expand(6, 1, 4, 5).clone()
    grid = class_grid(images, ids, to_pixels=lambda x: x)
    assert grid.shape == (3, 3 * (4 + 1) + 1, 2 * (5 + 1) + 1)  # grey -> 3 channels
    for c in range(3):
        for j in range(2):
            cell = _cell(grid, c, j, 4, 5)
            assert torch.allclose(cell, torch.full_like(cell, float(vals[2 * c + j])))
    assert torch.equal(grid[:, 0, :], torch.ones_like(grid[:, 0, :]))  # padding is white


def test_class_grid_caps_rows_pads_uneven_rows_and_rescales_without_to_pixels():
    ids = torch.tensor([0, 0, 0, 1])
    images = torch.randn(4, 3, 2, 2) * 5 + 7
    grid = class_grid(images, ids, max_per_class=2)
    assert grid.shape == (3, 2 * 3 + 1, 2 * 3 + 1)  # 2 rows x 2 columns
    # per-image min-max scaling: each image spans exactly [0, 1]
    for row, col, k in ((0, 0, 0), (0, 1, 1), (1, 0, 3)):
        cell = _cell(grid, row, col, 2, 2)
        assert float(cell.min()) == pytest.approx(0.0) and float(cell.max()) == pytest.approx(1.0)
        x = images[k]
        torch.testing.assert_close(cell, (x - x.min()) / (x.max() - x.min()))
    assert torch.equal(_cell(grid, 1, 1, 2, 2), torch.zeros(3, 2, 2))  # blank filler
    # to_pixels is applied, then clamped to [0, 1]
    g2 = class_grid(torch.full((2, 1, 2, 2), 0.25), torch.tensor([0, 1]), lambda x: 4 * x - 2)
    assert torch.equal(_cell(g2, 0, 0, 2, 2), torch.zeros(3, 2, 2))


class _Recorder:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, step):
        self.calls.append((tag, img.clone(), step))


def _fake(iteration: int, ema=None):
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2) / 6
    module = SimpleNamespace(iteration=torch.tensor(iteration), images=images, to_pixels=None,
                             class_ids=lambda: torch.tensor([0, 0, 1, 1, 2, 2]),
                             synthetic_ema=ema)
    rec = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(experiment=rec)])
    return trainer, module, rec


def test_logger_every_n_steps_with_ema_and_without_add_image():
    cb = SyntheticImageLogger(every_n_steps=5)
    ema = SyntheticEMA(0.5)
    trainer, module, rec = _fake(4)
    cb.on_train_batch_end(trainer, module, None, None, 3)
    assert rec.calls == []
    ema._start(module.images)
    module.iteration, module.synthetic_ema = torch.tensor(5), ema
    cb.on_train_batch_end(trainer, module, None, None, 4)
    # the set after 5 iterations, at the step of the iteration that made it
    assert [(t, s) for t, _, s in rec.calls] == [("synthetic/images", 4),
                                                 ("synthetic/ema_images", 4)]
    expected = class_grid(module.images, module.class_ids(), min_image_side=64)
    assert torch.equal(rec.calls[0][1], expected)
    assert expected.shape[-1] == 2 * (64 + 1) + 1  # 2x2 images enlarged 32x
    cb.on_train_end(trainer, module)  # training ends right after: not logged twice
    assert len(rec.calls) == 2
    module.iteration = torch.tensor(7)
    cb.on_train_end(trainer, module)
    assert [s for _, _, s in rec.calls[2:]] == [6, 6]
    # a logger without add_image (CSV) or no logger: nothing, no error
    module.iteration = torch.tensor(8)
    for loggers in ([], [SimpleNamespace(experiment=object())]):
        cb.on_train_end(SimpleNamespace(is_global_zero=True, loggers=loggers), module)
    # only rank 0 logs
    module.iteration = torch.tensor(9)
    trainer.is_global_zero = False
    cb.on_train_end(trainer, module)
    assert len(rec.calls) == 4


def test_tensorboard_events_hold_the_grids(tmp_path):
    build_tiny_store(tmp_path / "s", experts=1, epochs=3)
    module = DistillationModule(str(tmp_path / "s"), 2, iterations=4, syn_steps=2,
                                max_start_epoch=1, dsa=False)
    x, y = tiny_data()
    module.initialize(train_images=x, train_labels=y)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="", default_hp_metric=False)
    quiet_trainer(logger=logger, callbacks=[SyntheticImageLogger(every_n_steps=2),
                                            SyntheticEMA(0.9)]).fit(module)
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert set(acc.Tags()["images"]) == {"synthetic/images", "synthetic/ema_images"}
    steps = [e.step for e in acc.Images("synthetic/images")]
    # every 2 iterations (the set after 2 and after 4, at the steps that made them), and
    # the end of training, which is iteration 4's grid already
    assert steps == [1, 3]
    img = acc.Images("synthetic/images")[-1]
    # 8x8 images enlarged 8x to 64 pixels a side, padding 1
    assert (img.height, img.width) == (3 * 65 + 1, 2 * 65 + 1)
    scalars = acc.Tags()["scalars"]
    for tag in ("distill/loss", "distill/syn_lr", "distill/skipped", "distill/start_epoch",
                "distill/grad_norm/images"):
        assert tag in scalars, tag
