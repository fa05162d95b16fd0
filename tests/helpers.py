"""Shared test fixtures: tiny real data and tiny hand-built trajectory stores.

Everything is small enough for CPU unit tests (a ConvNet of width 4 and depth 2 on
1x8x8 images has 339 parameters). Deterministic: every function takes a seed.

- :func:`tiny_data`: random class-labelled images.
- :func:`build_tiny_store`: experts trained with a few plain SGD steps per "epoch"
  (no Lightning), one snapshot at initialisation and after each epoch.
- :func:`write_store`: a store from hand-made snapshot tensors (e.g. crafted final
  snapshots whose predictions are known).
- :func:`quiet_trainer`: a CPU Trainer without logger, checkpointing or progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lightning_distill.models import build_model
from lightning_distill.models.params import ParamSpec, flatten_parameters
from lightning_distill.trajectories import TrajectoryStore

#: build_model kwargs of the tiny store's network (339 parameters)
TINY_MODEL: dict[str, Any] = {
    "name": "ConvNet", "channels": 1, "num_classes": 3, "image_size": 8, "width": 4, "depth": 2,
}
TINY_INPUT_SPACE: dict[str, Any] = {"dataset": "tiny", "normalization": "meanstd",
                                    "mean": [0.0], "std": [1.0]}


def tiny_model(model: dict[str, Any] | None = None) -> torch.nn.Module:
    kw = dict(model or TINY_MODEL)
    return build_model(**kw)


def tiny_data(num_classes: int = 3, per_class: int = 6, channels: int = 1, size: int = 8,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per_class`` standard-normal images of each class, classes in blocks: (x, y)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.randn(y.numel(), channels, size, size, generator=g)
    x += 0.5 * y.view(-1, 1, 1, 1).float()  # a little class signal
    return x, y


def write_store(path: str | Path, experts: list[Tensor], model: dict[str, Any] | None = None,
                dataset: str = "tiny", input_space: dict[str, Any] | None = None,
                ) -> TrajectoryStore:
    """A store holding ``experts`` (each a [snapshots, P] tensor) as experts 0, 1, ..."""
    model = dict(model or TINY_MODEL)
    spec = ParamSpec.of(tiny_model(model))
    store = TrajectoryStore.create(
        path, spec=spec, num_snapshots=experts[0].shape[0], model=model, dataset=dataset,
        input_space=TINY_INPUT_SPACE if input_space is None else input_space,
        hparams={"kind": "test"})
    for i, snaps in enumerate(experts):
        store.write_expert(i, snaps)
    return store


def train_trajectory(net: torch.nn.Module, x: Tensor, y: Tensor, epochs: int,
                     steps_per_epoch: int = 2, batch: int = 8, lr: float = 0.1,
                     generator: torch.Generator | None = None) -> Tensor:
    """Plain SGD from ``net``'s parameters: [epochs + 1, P] snapshots (init, each epoch)."""
    spec = ParamSpec.of(net)
    theta = flatten_parameters(net).detach().clone()
    snaps = [theta.clone()]
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            idx = torch.randperm(x.shape[0], generator=generator)[:batch]
            th = theta.clone().requires_grad_(True)
            out = functional_call(net, spec.unflatten(th), (x[idx],))
            (g,) = torch.autograd.grad(F.cross_entropy(out, y[idx]), th)
            theta = theta - lr * g
        snaps.append(theta.clone())
    return torch.stack(snaps)


def build_tiny_store(path: str | Path, *, experts: int = 2, epochs: int = 4,
                     model: dict[str, Any] | None = None, data: tuple[Tensor, Tensor] | None = None,
                     steps_per_epoch: int = 2, lr: float = 0.1, seed: int = 0,
                     dataset: str = "tiny", input_space: dict[str, Any] | None = None,
                     ) -> TrajectoryStore:
    """``experts`` SGD trajectories of ``epochs`` epochs (``epochs + 1`` snapshots each)."""
    model = dict(model or TINY_MODEL)
    if data is None:
        data = tiny_data(model["num_classes"], 6, model["channels"], int(model["image_size"]),
                         seed=seed)
    x, y = data
    trajs = []
    for e in range(experts):
        torch.manual_seed(1000 * seed + e)
        net = tiny_model(model)
        g = torch.Generator().manual_seed(10_000 + 1000 * seed + e)
        trajs.append(train_trajectory(net, x, y, epochs, steps_per_epoch, lr=lr, generator=g))
    return write_store(path, trajs, model, dataset, input_space)


def quiet_trainer(**kw: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpointing, progress bar or model summary."""
    opts: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    opts.update(kw)
    if any(isinstance(c, pl.callbacks.Checkpoint) for c in opts.get("callbacks") or []):
        opts["enable_checkpointing"] = True  # Lightning refuses a Checkpoint callback otherwise
    return pl.Trainer(**opts)


# ------------------------------------------------------------------ distillation
def make_distill_module(store: str | Path, **kw: Any):
    """A tiny DistillationModule (ipc 2, 3 iterations of 3 steps, DSA on); ``kw``
    overrides any argument, ``ipc`` included."""
    from lightning_distill.modules.distill import DistillationModule

    opts: dict[str, Any] = dict(iterations=3, syn_steps=3, expert_epochs=2, max_start_epoch=2,
                                batch_syn=4, lr_img=10.0, lr_lr=1e-3, lr_y=2.0,
                                lr_teacher=0.05, dsa=True, dsa_flip=False, seed=7)
    opts.update(kw)
    ipc = opts.pop("ipc", 2)
    return DistillationModule(str(store), ipc, **opts)


def init_distill_module(module):
    """``module`` initialised from :func:`tiny_data` (returned for chaining)."""
    x, y = tiny_data()
    module.initialize(train_images=x, train_labels=y)
    return module


def distill_resume_setup(store: str | Path, iterations: int = 6, **kw: Any):
    """(module, callbacks) of the resume tests: soft labels learned, a sequential window
    and an EMA, so that every piece of state must survive a checkpoint."""
    from lightning_distill.callbacks.ema import SyntheticEMA
    from lightning_distill.callbacks.matching_window import MatchingWindow

    module = make_distill_module(store, iterations=iterations, learn_labels=True,
                                 max_start_epoch=3, **kw)
    callbacks = [MatchingWindow(0, 1, 3, 4, sequential=True), SyntheticEMA(decay=0.8)]
    return module, callbacks


class CrashAt(pl.Callback):
    """Raises ``KeyError("simulated crash")`` at the start of the iteration after ``at``
    (``at`` iterations done and their end-of-batch hooks run: Lightning runs Checkpoint
    callbacks last, so the checkpoint of iteration ``at`` is on disk)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.iteration) == self.at:
            raise KeyError("simulated crash")


# ------------------------------------------------------------------ digits store
#: the architecture of :func:`build_digits_store`
DIGITS_MODEL = {"name": "ConvNet", "channels": 1, "num_classes": 10, "image_size": 8,
                "width": 8, "depth": 2}


def build_digits_store(path: str | Path) -> Path:
    """2 experts x 3 epochs of a width-8 depth-2 ConvNet, a few SGD steps each on the
    real digits training split (in its input space), as a store at ``path``."""
    from lightning_distill.data.datamodule import RealDataModule

    dm = RealDataModule("digits")
    dm.setup("fit")
    build_tiny_store(path, experts=2, epochs=3, model=DIGITS_MODEL, data=dm.train_set.tensors,
                     steps_per_epoch=3, lr=0.05, dataset="digits", input_space=dm.input_space)
    return Path(path)


def random_digits_set(ipc: int = 2, seed: int = 0, lr: float = 0.05):
    """A random-real digits set (``ipc`` training images per class, in the data's input
    space), the stand-in for a distilled set in evaluation tests."""
    from lightning_distill.data.datamodule import RealDataModule
    from lightning_distill.data.synthetic import SyntheticSet

    dm = RealDataModule("digits")
    dm.setup("fit")
    x, y = dm.train_set.tensors
    return SyntheticSet.from_real(x, y, ipc, 10, generator=torch.Generator().manual_seed(seed),
                                  lr=lr, meta={"dataset": "digits",
                                               "input_space": dm.input_space})


def flat_config(cfg: Any) -> Any:
    """A parsed LightningCLI config with its subclass-mode ``model`` / ``data`` nodes
    (``class_path`` + ``init_args``) replaced by their init arguments, so tests read
    ``cfg.model.ipc`` whatever class the recipe names."""
    from lightning_distill.stages.distill import init_args

    cfg = cfg.clone()
    for key in ("model", "data"):
        if cfg.get(key) is not None:
            cfg[key] = init_args(cfg[key])
    return cfg
