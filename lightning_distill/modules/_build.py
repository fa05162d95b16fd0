"""What the library's LightningModules share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.utilities import rank_zero_warn

from ..errors import ConfigError


@contextmanager
def cpu_float32() -> Iterator[None]:
    """Build modules as eager construction does (on the CPU, in float32, initialised from
    the CPU generator) inside Lightning's ``configure_model`` contexts (the strategy's
    device, a true-precision default dtype); Lightning moves and converts them afterwards."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def check_fit(module: pl.LightningModule) -> None:
    """What every library module checks when a fit starts: its own optimizer
    (:func:`check_own_optimizer`) and a CPU run that asks for more processes than the
    machine has cores (:func:`warn_oversubscribed`)."""
    check_own_optimizer(module)
    try:
        trainer = module.trainer
    except RuntimeError:  # setup() called by hand, without a Trainer
        return
    warn_oversubscribed(trainer)


def warn_oversubscribed(trainer: pl.Trainer) -> None:
    """Warn (once, on rank 0) when a CPU run starts more processes on this machine than
    it has cores: each process then gets less than a core, and the run is slower than
    with fewer processes."""
    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = int(trainer.num_devices)
    if cores and processes > cores:
        rank_zero_warn(
            f"this CPU run starts {processes} processes per machine (trainer.devices) but the "
            f"machine has {cores} cores: each process gets less than a core; use "
            f"trainer.devices <= {cores}", category=UserWarning)


def check_own_optimizer(module: pl.LightningModule) -> None:
    """Refuse a module whose ``configure_optimizers`` was replaced (LightningCLI's
    ``--optimizer`` / ``--lr_scheduler`` do that): the library's modules train with the
    optimizer their method defines (SGD with the module's own lr and momentum
    arguments), and a distillation's optimizer steps pixels, labels and syn_lr in groups
    the method sets."""
    if "configure_optimizers" in vars(module):
        name = type(module).__name__
        raise ConfigError(
            f"{name}: its optimizer is part of the method and cannot be replaced (an "
            "--optimizer / --lr_scheduler of a LightningCLI, or configure_optimizers set on "
            f"the instance); set the learning rates and momenta through {name}'s own "
            "arguments (--model.lr ...), or subclass it and override configure_optimizers")
