"""PeriodicEvaluation: validate the synthetic set during distillation and keep the best.

Every ``every_n_steps`` outer iterations (training batches) and at the end of training,
the current synthetic set (``pl_module.synthetic_set()``) and, when an EMA is kept, the
EMA set (``pl_module.ema_synthetic_set()``, FTD: docs/method.md, 'EMA of the synthetic
images') are evaluated with the protocol of docs/method.md, 'Evaluation protocol'
(:meth:`~lightning_distill.functional.evaluation.EvalProtocol.train_runs`: ``runs``
fresh ``model`` networks for ``epochs`` epochs, ``group_size`` of them trained together
as one vectorised model) on a VALIDATION split of the training data. The best set by
mean validation accuracy is kept (and saved to ``best_path``). There is deliberately no
test-data argument: the test set never chooses anything (the reference code selects by
test accuracy, which inflates its numbers).

Evaluation runs plain torch loops, never a Trainer: starting a Trainer inside a running
Trainer is unsupported (PL #15967). Each evaluation uses the same run seeds
(``seed + r``), so successive evaluations are paired comparisons (same initialisations,
batch orders and augmentations), which makes the selection less noisy. Under several
processes (DDP), the runs are shared out: rank ``k`` trains runs ``k, k + W, ...``, and
every rank receives all accuracies, identical to a single-process evaluation (each
rank groups its own runs; a run's accuracy depends only on its seed, up to the
last-bit rounding differences of batched arithmetic).

Logged (to every logger of the Trainer; the set after k iterations at step k - 1, the
step of the iteration that made it, docs/design.md): ``val/acc_mean``,
``val/acc_std``, ``val_ema/acc_mean``, ``val_ema/acc_std``, ``val/best_acc``; the same
values are put in ``trainer.callback_metrics``.

Example::

    from lightning_distill.callbacks import PeriodicEvaluation, SyntheticEMA

    val_x, val_y = dm.val_images, dm.val_labels          # input space, held out
    evaluation = PeriodicEvaluation(val_x, val_y, every_n_steps=500, runs=3, epochs=300,
                                    best_path="runs/cifar10_ipc10/best.pt")
    trainer = pl.Trainer(max_steps=5000, callbacks=[SyntheticEMA(), evaluation])
    trainer.fit(distill_module)
    best = evaluation.best_synthetic_set     # selected by validation accuracy
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from ..data.augment import protocol_dsa
from ..data.splits import images_view, split_labels
from ..data.synthetic import SyntheticSet
from ..errors import InputError, InputTypeError, StateError
from ..functional.evaluation import EvalProtocol, summarize
from ..modules.evaluate import check_eval_data
from .progress import PhaseProgress

__all__ = ["PeriodicEvaluation"]

EvaluateFn = Callable[[SyntheticSet], Sequence[float]]


class PeriodicEvaluation(Callback):
    """Evaluate the synthetic set on a validation split every ``every_n_steps`` iterations.

    Args:
        val_images, val_labels: the validation split, already in the synthetic set's
            input space (normalised / ZCA), with integer class ids. Without them,
            ``trainer.datamodule.val_set``: a held split's tensors, or a streamed split
            read a batch at a time by each test pass (the same accuracies).
        every_n_steps: evaluate after every ``every_n_steps`` outer iterations
            (``pl_module.iteration``, else training batches counted by the fit loop; both
            keep counting across a resume); 0 turns periodic evaluation off.
        at_train_end: also evaluate when training ends (unless that step was just done).
        runs, model, model_kwargs, eval_batch_size: how many networks of which
            architecture, and the batch size of the validation passes.
        protocol: the training settings (:class:`EvalProtocol`, docs/method.md, 'Evaluation
        protocol'; ``lr=None``
            uses the set's learned lr; ``group_size`` runs train together as one
            vectorised model); keyword ``**overrides`` (``epochs=300``, ...) replace its
            fields.
        seed: run ``r`` of every evaluation uses seed ``seed + r``.
        evaluate_ema: also evaluate ``pl_module.ema_synthetic_set()`` when it exists.
        best_path: if given, the best set is saved there (atomically, with its PNG grid)
            each time it improves, on global rank 0.
        to_pixels: input space -> [0, 1] pixels for the PNG grid.
        evaluate_fn: replaces the evaluation: ``f(synthetic) -> accuracies`` (tests,
            custom protocols).
    """

    def __init__(
        self,
        val_images: Tensor | None = None,
        val_labels: Tensor | None = None,
        *,
        every_n_steps: int = 500,
        at_train_end: bool = True,
        runs: int = 5,
        model: str = "ConvNet",
        model_kwargs: Mapping[str, Any] | None = None,
        protocol: EvalProtocol | None = None,
        eval_batch_size: int = 1024,
        seed: int = 0,
        evaluate_ema: bool = True,
        best_path: str | os.PathLike | None = None,
        to_pixels: Callable[[Tensor], Tensor] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        **overrides: Any,
    ) -> None:
        self.protocol = EvalProtocol.resolve(protocol, overrides, "PeriodicEvaluation")
        if (val_images is None) != (val_labels is None):
            raise InputError("PeriodicEvaluation: give both val_images and val_labels, or "
                             "neither (then the validation split of trainer.datamodule)")
        if every_n_steps < 0 or runs < 1:
            raise InputError(
                f"PeriodicEvaluation: every_n_steps must be >= 0 and runs >= 1, got "
                f"{every_n_steps} and {runs}"
            )
        self.val_images: Any = None  # a tensor, or a streamed split's SplitImages
        self.val_labels: Tensor | None = None
        if val_images is not None:
            self._set_validation(val_images, val_labels)
        self.every_n_steps = int(every_n_steps)
        self.at_train_end = bool(at_train_end)
        self.runs = int(runs)
        self.model = model
        self.model_kwargs = None if model_kwargs is None else dict(model_kwargs)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self.evaluate_ema = bool(evaluate_ema)
        self.best_path = Path(best_path) if best_path is not None else None
        self.to_pixels = to_pixels
        self.evaluate_fn = evaluate_fn
        # state
        self.best_accuracy: float | None = None
        self.best_std: float | None = None
        self.best_step: int | None = None
        self.best_source: str | None = None
        self.best_synthetic_set: SyntheticSet | None = None
        self.last_eval_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.batches_seen = 0

    def _set_validation(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1:
            raise InputError(
                "PeriodicEvaluation: val_images must be [N, C, H, W] and val_labels [N] class "
                f"ids, got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise InputError(
                f"PeriodicEvaluation: {images.shape[0]} validation images but "
                f"{labels.shape[0]} labels (need the same number, at least one)"
            )
        # a streamed split's images stay a row source, read a batch at a time
        self.val_images = images.detach() if isinstance(images, Tensor) else images
        self.val_labels = labels.detach().long()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fill what the constructor left to the run: the validation split (from
        ``trainer.datamodule.val_set``), the image-grid transform (the datamodule's
        ``from_input_space``) and, when ``model_kwargs`` is None, the architecture keywords
        of the module's experts when ``model`` is their architecture (width, depth, ...)."""
        self.batches_seen = 0  # a resumed fit restores it after setup (load_state_dict)
        self.protocol = self.protocol.for_trainer(trainer.precision)  # precision None: the fit's
        dm = trainer.datamodule
        if self.val_images is None and self.evaluate_fn is None:
            val = getattr(dm, "val_set", None)
            if val is None or len(val) == 0:
                raise InputError(
                    "PeriodicEvaluation: no validation data: pass val_images / val_labels, "
                    "or fit with a datamodule that has a validation split (RealDataModule "
                    "with val_fraction > 0; its val_set after setup)")
            self._set_validation(images_view(val), split_labels(val))
        if self.to_pixels is None:
            self.to_pixels = getattr(dm, "from_input_space", None)
        if self.model_kwargs is None:
            store_model = dict(getattr(getattr(pl_module, "store", None), "model", None) or {})
            same = store_model.pop("name", None) == self.model
            self.model_kwargs = {k: v for k, v in store_model.items()
                                 if k not in ("channels", "num_classes", "image_size")
                                 } if same else {}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, synthetic: SyntheticSet, run_ids: Sequence[int] | None = None,
                 on_progress: Callable[[float], None] | None = None) -> list[float]:
        """Validation accuracies of fresh networks trained on ``synthetic``: runs
        ``run_ids`` (default: all ``runs``), run ``r`` seeded with ``seed + r``, so a run's
        accuracy does not depend on which process computes it. ``on_progress(runs)``
        after every epoch (:meth:`EvalProtocol.train_runs_results`).

        The networks train on ``synthetic.images.device`` (during fit: the module's device).
        """
        if self.evaluate_fn is not None:
            if run_ids is not None:
                raise InputError("PeriodicEvaluation: evaluate_fn evaluates all runs at once; "
                                 "run_ids cannot select some of them")
            return [float(a) for a in self.evaluate_fn(synthetic)]
        if self.val_images is None or self.val_labels is None:
            raise StateError("PeriodicEvaluation: no validation data yet (pass val_images / "
                             "val_labels, or let setup() read trainer.datamodule's)")
        check_eval_data(synthetic, self.val_images, self.val_labels, "PeriodicEvaluation",
                        "validation")
        dev = synthetic.images.device
        val_x, val_y = self.val_images, self.val_labels.to(dev)
        if isinstance(val_x, Tensor):  # a row source's batches move as they are read
            val_x = val_x.to(dev)
        protocol = self.protocol
        ids = range(self.runs) if run_ids is None else run_ids
        return protocol.train_runs(
            self.model, self.model_kwargs or {}, [self.seed + r for r in ids], synthetic.images,
            synthetic.labels, set_lr=synthetic.lr, num_classes=synthetic.num_classes,
            test_images=val_x, test_labels=val_y, test_batch_size=self.eval_batch_size,
            device=dev, augment=protocol_dsa(protocol, synthetic.meta.get("dataset")),
            on_progress=on_progress,
        )

    def _evaluate_on_all_ranks(self, trainer: pl.Trainer, synthetic: SyntheticSet,
                               on_progress: Callable[[float], None] | None = None
                               ) -> list[float]:
        """All ``runs`` accuracies, on every rank. Under several processes, rank ``k``
        trains runs ``k, k + W, ...`` and a sum-reduce assembles the list (each entry has
        exactly one non-zero contribution, so the sum is exact): the same numbers as one
        process, in 1/W of the time. ``evaluate_fn`` runs on rank 0 and is broadcast."""
        world = trainer.world_size
        if world == 1 or self.evaluate_fn is not None:
            accs = self.evaluate(synthetic, on_progress=on_progress) if (
                trainer.is_global_zero) else None
            return list(trainer.strategy.broadcast(accs, src=0))
        mine = list(range(trainer.global_rank, self.runs, world))
        local = torch.zeros(self.runs, dtype=torch.float64, device=synthetic.images.device)
        for r, acc in zip(mine, self.evaluate(synthetic, mine, on_progress), strict=True):
            local[r] = acc
        total = trainer.strategy.reduce(local, reduce_op="sum")
        return [float(a) for a in total.cpu()]

    @property
    def epochs(self) -> int:
        """``protocol.epochs``."""
        return self.protocol.epochs

    def _candidates(self, pl_module: pl.LightningModule) -> list[tuple[str, SyntheticSet]]:
        if not hasattr(pl_module, "synthetic_set"):
            raise InputTypeError(
                f"PeriodicEvaluation needs a module with synthetic_set() (the "
                f"DistillationModule); {type(pl_module).__name__} has none"
            )
        out = [("val", pl_module.synthetic_set())]
        if self.evaluate_ema and hasattr(pl_module, "ema_synthetic_set"):
            ema = pl_module.ema_synthetic_set()
            if ema is not None:
                out.append(("val_ema", ema))
        return out

    def run_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> dict[str, float]:
        """Evaluate the current (and EMA) set now, update the best set, log; return metrics."""
        metrics: dict[str, float] = {}
        improved = False
        candidates = self._candidates(pl_module)
        # a long evaluation (runs x epochs of fresh networks) is not a silent pause
        pl_module.print(f"iteration {step}: evaluating {len(candidates)} set(s) on the "
                        f"validation split ({self.runs} run(s) x {self.epochs} epochs) ...")
        bar = PhaseProgress(trainer, f"validation runs (iteration {step})",
                            total=self.runs * len(candidates), report=pl_module.print)
        # train on the module's device, on copies outside the module's graph
        candidates = [(p, s.detach_clone().to(pl_module.device)) for p, s in candidates]
        with bar:
            accs_of = [self._evaluate_on_all_ranks(trainer, syn, bar.advance)
                       for _, syn in candidates]
        for (prefix, syn), accs in zip(candidates, accs_of, strict=True):
            mean, std = summarize(accs)
            metrics[f"{prefix}/acc_mean"] = mean
            metrics[f"{prefix}/acc_std"] = std
            self.history.append(
                {"step": int(step), "source": prefix, "accs": [float(a) for a in accs],
                 "mean": mean, "std": std}
            )
            if self.best_accuracy is None or mean > self.best_accuracy:
                improved = True
                self.best_accuracy, self.best_std = mean, std
                self.best_step, self.best_source = int(step), prefix
                best = syn.to("cpu")
                best.meta.pop("path", None)
                best.meta.update(
                    {"iteration": int(step), "selected_by": "validation accuracy",
                     "selected_from": "ema" if prefix == "val_ema" else "current",
                     "val_acc_mean": mean, "val_acc_std": std}
                )
                self.best_synthetic_set = best
        assert self.best_accuracy is not None
        metrics["val/best_acc"] = self.best_accuracy
        pl_module.print("iteration {}: {}; best {:.1f}% (iteration {}, {})".format(
            step, ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()
                            if k.endswith("acc_mean")),
            100 * self.best_accuracy, self.best_step, self.best_source))
        self.last_eval_step = int(step)
        for logger in trainer.loggers:  # the set after `step` iterations: made at step - 1
            logger.log_metrics(metrics, step=max(0, int(step) - 1))
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if improved and self.best_path is not None and trainer.is_global_zero:
            assert self.best_synthetic_set is not None
            self.best_synthetic_set.save(self.best_path, to_pixels=self.to_pixels)
        return metrics

    # ------------------------------------------------------------------ hooks
    def _iteration(self, pl_module: pl.LightningModule) -> int:
        """Outer iterations completed: ``pl_module.iteration`` when the module keeps one
        (DistillationModule does, in its checkpointed state), else the training batches
        this callback has seen (in its state, so it survives a resume).

        ``trainer.global_step`` is not used: under manual optimisation it counts optimizer
        steps (one per optimizer per iteration, none when an iteration is skipped).
        """
        it = getattr(pl_module, "iteration", None)
        if it is not None:
            return int(it)
        return self.batches_seen

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        self.batches_seen += 1
        step = self._iteration(pl_module)
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_eval_step:
            self.run_evaluation(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._iteration(pl_module)
        if self.at_train_end and step > 0 and step != self.last_eval_step:
            self.run_evaluation(trainer, pl_module, step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        best = self.best_synthetic_set
        return {
            "best_accuracy": self.best_accuracy,
            "best_std": self.best_std,
            "best_step": self.best_step,
            "best_source": self.best_source,
            "best_set": None if best is None else best.to_dict(),
            "last_eval_step": self.last_eval_step,
            "history": [dict(h) for h in self.history],
            "batches_seen": self.batches_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_accuracy = state_dict.get("best_accuracy")
        self.best_std = state_dict.get("best_std")
        self.best_step = state_dict.get("best_step")
        self.best_source = state_dict.get("best_source")
        payload = state_dict.get("best_set")
        self.best_synthetic_set = None if payload is None else SyntheticSet.from_dict(
            payload, where="PeriodicEvaluation state 'best_set'")
        self.last_eval_step = state_dict.get("last_eval_step")
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.batches_seen = int(state_dict.get("batches_seen", 0))
