"""EvalModule: train a fresh network on a synthetic set and test it (REFERENCE section 6).

The protocol every published number uses: SGD (momentum 0.9, weight decay 5e-4), lr =
the set's learned alpha, ``epochs`` epochs (1000) of shuffled minibatches with DSA on
every batch, the lr multiplied by 0.1 at the start of epoch ``epochs // 2`` with the
momentum buffers reset (the reference re-creates the optimizer), soft cross-entropy for
soft labels, one test at the end on the real test set in the SAME input space.

Example::

    import pytorch_lightning as pl
    from lightning_distill import EvalModule

    module = EvalModule("runs/cifar10_ipc10/best.pt", model="ConvNet", epochs=1000)
    trainer = pl.Trainer(max_epochs=module.epochs, logger=False)
    trainer.fit(module)                                  # trains on the synthetic set
    trainer.test(module, dataloaders=test_loader)        # logs test/acc
    print(module.test_accuracy)

The training data always comes from the module (its ``train_dataloader``); pass
validation data as ``trainer.fit(module, val_dataloaders=...)`` and test data to
``trainer.test(module, dataloaders=...)`` or ``trainer.test(module, datamodule=dm)``.
For K networks and several architectures use :func:`evaluate_synthetic`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..data.augment import ResumableGenerator
from ..data.synthetic import SyntheticSet
from ..functional.evaluation import (
    DEFAULT_DSA_STRATEGY,
    lr_at_epoch,
    make_dsa,
    resolve_decay_epoch,
    run_seeds,
    seeded_model,
    summarize,
    train_and_evaluate,
)
from ..functional.losses import classification_loss

__all__ = ["EvalModule", "evaluate_synthetic"]


@dataclass(frozen=True)
class EvalProtocol:
    """The training protocol of REFERENCE section 6 (defaults: the published one).

    One place for the settings shared by :class:`EvalModule`, :func:`evaluate_synthetic`
    and :class:`~lightning_distill.callbacks.PeriodicEvaluation`; ``lr=None`` means the
    synthetic set's learned lr.
    """

    epochs: int = 1000
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_epoch: int | None = None
    dsa: bool = True
    dsa_strategy: str = DEFAULT_DSA_STRATEGY
    dsa_flip: bool | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as :class:`EvalModule` keywords."""
        return dataclasses.asdict(self)

    def augment(self, synthetic: SyntheticSet) -> Any:
        """The DSA of the protocol for ``synthetic``'s data set (:func:`make_dsa`)."""
        return make_dsa(synthetic.meta.get("dataset"), self.dsa, self.dsa_strategy, self.dsa_flip)

    def train_run(
        self,
        synthetic: SyntheticSet,
        model: str,
        model_kwargs: Mapping[str, Any],
        run_seed: int,
        test_images: Tensor,
        test_labels: Tensor,
        test_batch_size: int,
        device: torch.device,
        augment: Any,
    ) -> float:
        """Test accuracy of one fresh ``model`` trained on ``synthetic`` with the plain loop.

        Network init, batch order and DSA draws derive from ``run_seed`` (:func:`run_seeds`).
        """
        init_seed, shuffle_seed, dsa_seed = run_seeds(run_seed)
        net = seeded_model(
            model, synthetic.channels, synthetic.num_classes, synthetic.image_size,
            seed=init_seed, **model_kwargs,
        ).to(device)
        out = train_and_evaluate(
            net, synthetic.images, synthetic.labels,
            lr=synthetic.lr if self.lr is None else self.lr,
            epochs=self.epochs, batch_size=self.batch_size, momentum=self.momentum,
            weight_decay=self.weight_decay, lr_decay_epoch=self.lr_decay_epoch,
            augment=augment,
            generator=torch.Generator().manual_seed(shuffle_seed),
            augment_generator=ResumableGenerator(dsa_seed).generator,
            test_images=test_images, test_labels=test_labels, test_batch_size=test_batch_size,
        )
        return out["accuracy"]


def check_eval_data(
    synthetic: SyntheticSet,
    images: Tensor,
    labels: Tensor,
    where: str,
    what: str,
    input_space: Mapping[str, Any] | None = None,
    hint: str = "",
) -> None:
    """Raise ``ValueError`` unless ``images``/``labels`` can test a network trained on
    ``synthetic``: same channels, image size (and input space, when given) and no label
    beyond the set's classes. ``where``/``what`` name the caller and the data in messages."""
    synthetic.check_compatible(
        channels=images.shape[1], image_size=tuple(images.shape[2:]),
        num_classes=synthetic.num_classes, input_space=input_space,
    )
    if labels.numel() and int(labels.max()) >= synthetic.num_classes:
        raise ValueError(
            f"{where}: {what} labels reach class {int(labels.max())} but the synthetic set "
            f"has {synthetic.num_classes} classes{hint}"
        )


class _EpochPermutationSampler(Sampler[int]):
    """One ``torch.randperm(n, generator)`` per epoch: the plain loop's batch order."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.n


class EvalModule(pl.LightningModule):
    """Train a fresh ``build_model`` network on a :class:`SyntheticSet` (REFERENCE 6).

    Args:
        synthetic: the set, or the path of a file written by :meth:`SyntheticSet.save`.
        model, model_kwargs: ``build_model`` name and extra keywords.
        epochs: training epochs; the Trainer's ``max_epochs`` must equal it.
        batch_size: minibatch size over the synthetic set (256 MTT, 128 DATM).
        lr: initial lr; default ``synthetic.lr`` (the learned alpha).
        momentum, weight_decay: SGD settings (0.9, 5e-4).
        lr_decay_epoch: the epoch at whose start lr -> 0.1 lr and momentum is reset
            (default ``epochs // 2``; see :func:`resolve_decay_epoch`).
        dsa, dsa_strategy, dsa_flip: DSA on every batch; ``dsa_flip=None`` drops flip
            for digit data sets (from ``synthetic.meta["dataset"]``).
        seed: the network init, batch order and DSA draws derive from it
            (:func:`run_seeds`), exactly as in :func:`train_and_evaluate` via
            :func:`evaluate_synthetic`.
    """

    def __init__(
        self,
        synthetic: SyntheticSet | str | os.PathLike,
        model: str = "ConvNet",
        model_kwargs: dict[str, Any] | None = None,
        epochs: int = 1000,
        batch_size: int = 256,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_decay_epoch: int | None = None,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["synthetic"])
        if isinstance(synthetic, (str, os.PathLike)):
            self.hparams["synthetic"] = os.fspath(synthetic)
            synthetic = SyntheticSet.load(synthetic)
        if not isinstance(synthetic, SyntheticSet):
            raise TypeError(
                f"EvalModule: synthetic must be a SyntheticSet or a file path, got "
                f"{type(synthetic).__name__}"
            )
        if epochs < 1:
            raise ValueError(f"EvalModule: epochs must be >= 1, got {epochs}")
        self.synthetic = synthetic.detach_clone()
        self.epochs = int(epochs)
        self.eval_lr = float(synthetic.lr if lr is None else lr)
        if not self.eval_lr > 0:
            raise ValueError(f"EvalModule: lr must be > 0, got {self.eval_lr}")
        self.decay_epoch = resolve_decay_epoch(self.epochs, lr_decay_epoch)
        init_seed, self._shuffle_seed, self._dsa_seed = run_seeds(seed)
        self.net = seeded_model(
            model, synthetic.channels, synthetic.num_classes, synthetic.image_size,
            seed=init_seed, **(model_kwargs or {}),
        )
        self.augment = make_dsa(synthetic.meta.get("dataset"), dsa, dsa_strategy, dsa_flip)
        self._shuffle_generator = torch.Generator().manual_seed(self._shuffle_seed)
        self._dsa_stream = ResumableGenerator(self._dsa_seed)
        self._counts: dict[str, list[int]] = {}
        self.val_accuracy: float | None = None
        self.test_accuracy: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # -- randomness -------------------------------------------------------------------
    @property
    def dsa_generator(self) -> torch.Generator:
        """The DSA generator, seeded from ``run_seeds(seed)[2]``; on the CPU whatever the
        module's device (:class:`ResumableGenerator`), as in :meth:`EvalProtocol.train_run`,
        so a checkpoint written on a GPU resumes on a CPU and vice versa."""
        return self._dsa_stream.generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["eval_generators"] = {
            "dsa": self._dsa_stream.state(),
            "shuffle": self._shuffle_generator.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("eval_generators") or {}
        if "shuffle" in state:
            self._shuffle_generator.set_state(state["shuffle"].to("cpu", torch.uint8))
        self._dsa_stream.restore(state.get("dsa"))

    # -- data -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """The synthetic set, reshuffled every epoch (one ``randperm`` per epoch)."""
        s = self.synthetic
        ds = TensorDataset(s.images.cpu(), s.labels.cpu())
        sampler = _EpochPermutationSampler(len(ds), self._shuffle_generator)
        return DataLoader(ds, batch_size=int(self.hparams.batch_size), sampler=sampler)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and is_overridden("train_dataloader", dm):
            raise ValueError(
                "EvalModule trains on its synthetic set, but trainer.fit got a datamodule "
                f"({type(dm).__name__}) whose train_dataloader would replace it; call "
                "trainer.fit(module, val_dataloaders=dm.val_dataloader()) instead and "
                "trainer.test(module, datamodule=dm) afterwards"
            )
        if self.trainer.max_epochs != self.epochs:
            raise ValueError(
                f"EvalModule(epochs={self.epochs}) needs Trainer(max_epochs={self.epochs}), "
                f"got max_epochs={self.trainer.max_epochs}: the lr schedule (x0.1 at epoch "
                f"{self.decay_epoch}) is defined by the module's epochs"
            )

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.net.parameters(), lr=self.eval_lr, momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )

    def on_train_epoch_start(self) -> None:
        """Exact schedule: lr for epoch e is ``lr_at_epoch``; at the decay epoch the SGD
        state (momentum buffers) is cleared, i.e. the optimizer is re-created in place."""
        opt = self.optimizers(use_pl_optimizer=False)
        epoch = self.current_epoch
        for group in opt.param_groups:
            group["lr"] = lr_at_epoch(self.eval_lr, epoch, self.decay_epoch)
        if self.decay_epoch is not None and epoch == self.decay_epoch:
            opt.state.clear()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.augment is not None:
            x = self.augment(x, generator=self.dsa_generator)
        loss = classification_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    # -- validation / test: exact correct / total counts -------------------------------
    def _count(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        c = self._counts.setdefault(stage, [0, 0])
        c[0] += int((logits.argmax(1) == y).sum().item())
        c[1] += int(y.shape[0])
        self.log(f"{stage}/loss", F.cross_entropy(logits, y.long()), batch_size=y.shape[0],
                 sync_dist=True)

    def _finish(self, stage: str) -> float | None:
        correct, total = self._counts.pop(stage, [0, 0])
        counts = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[1] <= 0:
            return None
        acc = int(counts[0].item()) / int(counts[1].item())
        self.log(f"{stage}/acc", acc, prog_bar=True)
        return acc

    def on_validation_epoch_start(self) -> None:
        self._counts.pop("val", None)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._count(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_accuracy = self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._counts.pop("test", None)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._count(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_accuracy = self._finish("test")


def trainer_device_args(device: torch.device) -> dict[str, Any]:
    """``accelerator`` / ``devices`` keywords for a one-device Trainer on ``device``
    (``cuda:1`` -> ``accelerator="gpu", devices=[1]``: ``devices=1`` would mean cuda:0)."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def _quiet_trainer(epochs: int, device: torch.device) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, **trainer_device_args(device), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def evaluate_synthetic(
    synthetic: SyntheticSet | str | os.PathLike,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    models: Sequence[str] = ("ConvNet",),
    runs: int = 5,
    seed: int = 0,
    epochs: int = 1000,
    batch_size: int = 256,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_decay_epoch: int | None = None,
    dsa: bool = True,
    dsa_strategy: str = DEFAULT_DSA_STRATEGY,
    dsa_flip: bool | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    test_batch_size: int = 1024,
    input_space: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    use_trainer: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train ``runs`` fresh networks per architecture on ``synthetic`` and test them.

    Run ``r`` uses seed ``seed + r`` (network init, batch order and DSA through
    :func:`run_seeds`), so architectures and baselines see paired seeds. The plain loop
    (:func:`train_and_evaluate`, default, fast) and ``use_trainer=True``
    (:class:`EvalModule` + ``Trainer``) give the same accuracies for the same seed.

    ``test_images`` must already be in the synthetic set's input space (normalised or
    ZCA whitened as during distillation): nothing is transformed here. Pass the data's
    ``input_space`` dict to have it checked against ``synthetic.meta["input_space"]``.
    ``model_kwargs`` maps a model name to extra ``build_model`` keywords.

    Returns:
        ``{model: {"accs": [...], "mean": m, "std": s}}`` with :func:`summarize` (population
        std).
    """
    if isinstance(synthetic, (str, os.PathLike)):
        synthetic = SyntheticSet.load(synthetic)
    if runs < 1:
        raise ValueError(f"evaluate_synthetic: runs must be >= 1, got {runs}")
    if test_images.dim() != 4:
        raise ValueError(
            f"evaluate_synthetic: test_images must be [N, C, H, W], got {tuple(test_images.shape)}"
        )
    check_eval_data(
        synthetic, test_images, test_labels, "evaluate_synthetic", "test", input_space,
        hint="; use the matching data set",
    )
    dev = torch.device(device) if device is not None else synthetic.images.device
    protocol = EvalProtocol(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, lr_decay_epoch=lr_decay_epoch, dsa=dsa,
        dsa_strategy=dsa_strategy, dsa_flip=dsa_flip,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        mkw = dict((model_kwargs or {}).get(name, {}))
        accs: list[float] = []
        for r in range(runs):
            run_seed = int(seed) + r
            if use_trainer:
                accs.append(_run_with_trainer(
                    synthetic, name, mkw, run_seed, protocol, test_images, test_labels,
                    test_batch_size, dev,
                ))
            else:
                accs.append(protocol.train_run(
                    synthetic, name, mkw, run_seed, test_images, test_labels,
                    test_batch_size, dev, augment=protocol.augment(synthetic),
                ))
        mean, std = summarize(accs)
        results[name] = {"accs": accs, "mean": mean, "std": std}
    return results


def _run_with_trainer(
    synthetic: SyntheticSet, name: str, mkw: dict, run_seed: int, protocol: EvalProtocol,
    test_images: Tensor, test_labels: Tensor, test_batch_size: int, dev: torch.device,
) -> float:
    module = EvalModule(
        synthetic, model=name, model_kwargs=mkw, seed=run_seed, **protocol.as_kwargs()
    )
    test_loader = DataLoader(
        TensorDataset(test_images.detach().cpu(), test_labels.detach().cpu().long()),
        batch_size=test_batch_size,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer = _quiet_trainer(module.epochs, dev)
        trainer.fit(module)
        trainer.test(module, dataloaders=test_loader, verbose=False)
    assert module.test_accuracy is not None
    return module.test_accuracy
