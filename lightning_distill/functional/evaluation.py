"""The evaluation protocol as a plain torch loop (docs/method.md, 'Evaluation protocol'; no
Lightning).

A synthetic set is worth the test accuracy of fresh networks trained on it:

- SGD, momentum 0.9, weight decay 5e-4, lr = the learned alpha (syn_lr);
- ``epochs`` epochs (1000) of shuffled minibatches (``batch_size`` 256 MTT / 128 DATM,
  last partial batch kept), DSA on every batch;
- at the start of epoch ``lr_decay_epoch`` (default ``epochs // 2``) the lr becomes
  0.1 x lr and the optimizer is RE-CREATED, so its momentum buffers restart at zero
  (as the reference does);
- loss: cross-entropy for hard labels, soft cross-entropy
  ``mean_b sum_k -log_softmax(out)_bk softmax(Y)_bk`` for soft labels (DATM's soft labels,
  docs/method.md 'Soft labels and initialisation');
- one test at the end, ``net.eval()`` under ``no_grad``, on data that is ALREADY in the
  synthetic set's input space (normalised or ZCA whitened): nothing is transformed here.

Precision: ``precision="bf16-mixed"`` (or ``"16-mixed"``, with a gradient scaler, on a GPU)
runs every training step and the test under ``torch.autocast``; the networks, their
weights, gradients and optimizer state stay float32 (docs/method.md, 'Mixed precision').

Mean +- std over K networks: :func:`summarize` (population std, as the papers' ``np.std``).

K runs at once: :func:`train_and_evaluate_group` trains K fresh networks as one
vectorised model (:class:`~lightning_distill.functional.batched.StackedNetworks`), each
with its own initialisation, batch order, DSA draws and (random-real baseline) its own
training set; :class:`EvalProtocol` bundles the settings, ``group_size`` included, and
:meth:`EvalProtocol.train_runs` runs a list of seeds in groups of ``group_size``.

The augmenter is an argument (``augment(x, generator=...)``, e.g.
:class:`~lightning_distill.data.DSA`, built by :func:`lightning_distill.data.augment.make_dsa`
from the protocol): this module is pure torch and imports nothing above it.

This loop is used by :class:`~lightning_distill.callbacks.PeriodicEvaluation` during
distillation, where no Trainer may be started inside the running Trainer (PL #15967).
:class:`~lightning_distill.modules.EvalModule` is the same protocol inside ``trainer.fit``.

Differences from the reference loop, on purpose: the reference runs ``Epoch + 1`` epochs
and decays after epoch ``Epoch // 2 + 1``; here exactly ``epochs`` epochs run, the first
``lr_decay_epoch`` at lr and the rest at 0.1 lr (500 / 500 for 1000). Every random draw
(network init, batch order, DSA) comes from seeds (:func:`run_seeds`), so a run is
reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, InputTypeError
from .batched import StackedNetworks, augment_members, chunks, gather_members, member_losses
from .losses import classification_loss

__all__ = [
    "CPU_GROUP_MAX_PIXELS",
    "DEFAULT_GROUP_SIZE",
    "class_accuracies",
    "evaluate_accuracy",
    "EvalProtocol",
    "EVAL_PRECISIONS",
    "mixed_precision",
    "lr_at_epoch",
    "resolve_decay_epoch",
    "run_seeds",
    "seeded_model",
    "summarize",
    "train_and_evaluate",
    "train_and_evaluate_group",
]




def run_seeds(seed: int) -> tuple[int, int, int]:
    """(init_seed, shuffle_seed, dsa_seed) derived from one run seed.

    Uses ``numpy.random.SeedSequence(seed)`` so the three streams are independent; both
    the plain loop and :class:`EvalModule` derive their randomness this way, which makes
    them draw the same network, batch order and augmentations for the same seed.
    """
    a, b, c = np.random.SeedSequence(int(seed)).generate_state(3, dtype=np.uint32)
    return int(a), int(b), int(c)


def seeded_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    *,
    seed: int,
    **kwargs: Any,
) -> nn.Module:
    """``build_model(...)`` with its initialisation drawn from ``manual_seed(seed)``.

    The CPU RNG is forked, so the caller's global random state is untouched.
    """
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(name, channels, num_classes, image_size, **kwargs)


def resolve_decay_epoch(epochs: int, lr_decay_epoch: int | None) -> int | None:
    """The epoch at whose start the lr drops 10x, or None when it never drops.

    Default ``epochs // 2``; a value outside ``1 .. epochs - 1`` means no decay (so a
    1-epoch run trains at the full lr).
    """
    e = epochs // 2 if lr_decay_epoch is None else int(lr_decay_epoch)
    return e if 0 < e < epochs else None


def lr_at_epoch(lr: float, epoch: int, decay_epoch: int | None) -> float:
    """lr for ``epoch``: ``lr`` before ``decay_epoch``, ``0.1 * lr`` from it on."""
    return lr * 0.1 if decay_epoch is not None and epoch >= decay_epoch else lr


def summarize(accs: Sequence[float]) -> tuple[float, float]:
    """(mean, std) of per-network accuracies; std is the POPULATION std (ddof=0).

    This is ``np.mean`` / ``np.std`` with numpy's default ``ddof=0``, which is what the
    MTT / FTD / DATM papers report. One run gives std 0.
    """
    a = np.asarray(list(accs), dtype=np.float64)
    if a.size == 0:
        raise InputError("summarize: no accuracies given (run at least one network)")
    return float(a.mean()), float(a.std())


#: the precisions of the protocol's own loops; the mixed ones' autocast dtypes
EVAL_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def mixed_precision(precision: str, device: torch.device | str
                    ) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """The autocast context and gradient scaler of a training loop on ``device`` in
    ``precision`` (one of :data:`EVAL_PRECISIONS`): both disabled for ``"32-true"``; the
    scaler is enabled for ``"16-mixed"`` only (bfloat16 has float32's range)."""
    if precision not in EVAL_PRECISIONS:
        raise InputError(f"precision must be one of {EVAL_PRECISIONS}, got {precision!r}")
    kind = torch.device(device).type
    dtype = _MIXED.get(precision)
    autocast = torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    return autocast, torch.amp.GradScaler(kind, enabled=dtype == torch.float16)


def _is_rows(images: Any) -> bool:
    """Whether ``images`` is a row source rather than a tensor: an object with ``shape``
    whose ``images[index]`` (an int64 CPU index, or a slice) gathers and returns those
    rows as a tensor, e.g. a streamed split's
    :class:`~lightning_distill.data.splits.SplitImages`. Such a training set is read a
    batch at a time (each step gathers its rows, on the CPU, then moves them), never
    whole; a list or tuple is a sequence of per-run tensors, not a row source."""
    return (not isinstance(images, (Tensor, list, tuple)) and hasattr(images, "shape")
            and hasattr(images, "__getitem__"))


def _device_of(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


def class_accuracies(correct: Sequence[int], support: Sequence[int]) -> list[float | None]:
    """Per-class accuracy ``correct[c] / support[c]`` (exact fractions of integer counts);
    None for a class without test samples."""
    return [int(c) / int(s) if int(s) else None
            for c, s in zip(list(correct), list(support), strict=True)]


@torch.no_grad()
def _test(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int
          ) -> tuple[float, float, list[float | None]]:
    """(accuracy, mean cross-entropy, per-class accuracy) of ``net`` in eval mode; counts
    are exact integers."""
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"test data: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise InputError("test data is empty")
    dev = _device_of(net)
    net.eval()
    correct = 0
    loss_sum = 0.0
    per_class = support = None
    n = int(images.shape[0])
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size].to(dev)
        y = labels[i : i + batch_size].to(dev).long()
        out = net(x)
        hit = out.argmax(1) == y
        correct += int(hit.sum().item())
        loss_sum += float(F.cross_entropy(out, y, reduction="sum").item())
        c = int(out.shape[1])
        hits, seen = torch.bincount(y[hit], minlength=c), torch.bincount(y, minlength=c)
        per_class = hits if per_class is None else per_class + hits
        support = seen if support is None else support + seen
    assert per_class is not None and support is not None
    return correct / n, loss_sum / n, class_accuracies(per_class.tolist(), support.tolist())


def evaluate_accuracy(
    net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy (correct / total) of ``net`` on (images, labels), eval mode, no grad.

    ``images`` must already be in the network's input space; they are moved to the
    network's device batch by batch.
    """
    return _test(net, images, labels, batch_size)[0]


def train_and_evaluate(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    lr: float,
    epochs: int = 1000,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_decay_epoch: int | None = None,
    augment: Callable[..., Tensor] | None = None,
    generator: torch.Generator | None = None,
    augment_generator: torch.Generator | None = None,
    test_images: Tensor,
    test_labels: Tensor,
    test_batch_size: int = 1024,
    on_epoch_start: Callable[[int, torch.optim.Optimizer], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    precision: str = "32-true",
) -> dict[str, float]:
    """Train ``net`` on (images, labels) with the protocol of docs/method.md, 'Evaluation
    protocol', then test once.

    Args:
        net: a freshly initialised network (trained in place, on its own device).
        images, labels: the training set ([N] class ids or [N, K] soft-label logits);
            detached, so a synthetic set's autograd graph is never touched. ``images``
            may be a row source instead of a tensor (a streamed split's
            :class:`~lightning_distill.data.splits.SplitImages`): each batch then gathers
            its own rows (same order, same values: the same result as the tensor).
        lr: initial learning rate (the synthetic set's learned alpha).
        lr_decay_epoch: the lr is multiplied by 0.1 at the start of this epoch by
            re-creating the SGD optimizer (momentum restarts); see
            :func:`resolve_decay_epoch`.
        augment: DSA-like callable ``augment(x, generator=...)`` applied to every batch.
        generator: draws each epoch's batch order (``torch.randperm``).
        augment_generator: passed to ``augment``; defaults to ``generator``.
        test_images, test_labels: the test (or validation) split, in the same input space
            (``test_images`` a tensor or a row source, read ``test_batch_size`` rows at a
            time either way).
        on_epoch_end: optional hook ``f(epoch)`` called after each epoch (progress).
        on_epoch_start: optional hook ``f(epoch, optimizer)`` called before each epoch
            (for instrumentation).
        precision: one of :data:`EVAL_PRECISIONS` (:func:`mixed_precision`).

    Returns:
        ``{"accuracy", "loss"}`` on the test data, ``"class_accuracy"`` (one per class:
        the fraction of its test images classified right, None for a class without test
        images) and ``"train_loss"``, the mean training loss of the last epoch.
    """
    if epochs < 1:
        raise InputError(f"train_and_evaluate: epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise InputError(f"train_and_evaluate: batch_size must be >= 1, got {batch_size}")
    if not float(lr) > 0:
        raise InputError(
            f"train_and_evaluate: lr must be > 0, got {lr} (a learned syn_lr that went "
            "negative means distillation diverged)"
        )
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"training data: {images.shape[0]} images but {labels.shape[0]} labels")
    dev = _device_of(net)
    rows = _is_rows(images)
    x_all = images if rows else images.detach().to(dev)
    y_all = labels.detach().to(dev)
    if augment_generator is None:
        augment_generator = generator
    lr = float(lr)
    decay = resolve_decay_epoch(epochs, lr_decay_epoch)

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            net.parameters(), lr=rate, momentum=momentum, weight_decay=weight_decay
        )

    n = int(x_all.shape[0])
    opt = make_optimizer(lr)
    train_loss = float("nan")
    autocast, scaler = mixed_precision(precision, dev)
    with torch.enable_grad(), autocast:
        for epoch in range(epochs):
            if decay is not None and epoch == decay:
                opt = make_optimizer(lr_at_epoch(lr, epoch, decay))
            if on_epoch_start is not None:
                on_epoch_start(epoch, opt)
            net.train()
            if generator is not None:
                perm = torch.randperm(n, generator=generator, device=generator.device)
            else:
                perm = torch.randperm(n)
            perm_rows = perm.cpu() if rows else None
            perm = perm.to(dev)
            total = torch.zeros((), device=dev)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                y = y_all[idx]
                # a row source: gather this batch's rows only (the same values as
                # indexing the whole tensor)
                x = x_all[perm_rows[i : i + batch_size]].to(dev) if rows else x_all[idx]
                if augment is not None:
                    x = augment(x, generator=augment_generator)
                loss = classification_loss(net(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.detach() * int(idx.numel())
            train_loss = float(total) / n
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    with autocast:
        acc, test_loss, per_class = _test(net, test_images, test_labels, test_batch_size)
    return {"accuracy": acc, "loss": test_loss, "train_loss": train_loss,
            "class_accuracy": per_class}


def train_and_evaluate_group(
    nets: Sequence[nn.Module],
    images: Tensor | Sequence[Tensor],
    labels: Tensor | Sequence[Tensor],
    *,
    lr: float,
    epochs: int = 1000,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_decay_epoch: int | None = None,
    augment: Callable[..., Tensor] | None = None,
    generators: Sequence[torch.Generator],
    augment_generators: Sequence[torch.Generator] | None = None,
    test_images: Tensor,
    test_labels: Tensor,
    test_batch_size: int = 1024,
    backend: str = "auto",
    on_epoch_end: Callable[[int], None] | None = None,
    precision: str = "32-true",
) -> list[dict[str, float]]:
    """:func:`train_and_evaluate` for K networks at once, as one vectorised model.

    Member k is trained exactly as ``train_and_evaluate(nets[k], ..., generator=
    generators[k], augment_generator=augment_generators[k])`` would train it (the same
    batch order, DSA draws, SGD with momentum and weight decay, lr drop with the
    optimizer re-created), up to floating-point rounding: the K networks are stacked
    into a :class:`~lightning_distill.functional.batched.StackedNetworks` on ``nets[0]``'s
    device and one SGD steps them all (SGD is element-wise, so it is per-member SGD on
    the sum of the members' losses).

    Args:
        nets: K freshly initialised networks of one architecture (not modified).
        images, labels: one training set for every member (``[N, ...]``) or one per
            member (a sequence of K tensors of the same shape: the random-real
            baseline's subsets); the shared one may be a row source, as in
            :func:`train_and_evaluate` (each step gathers its K x b rows).
        generators: K generators of the batch orders (one ``randperm`` per epoch each).
        augment_generators: K generators passed to ``augment`` (default: ``generators``).
        backend: :class:`StackedNetworks` backend.
        precision: one of :data:`EVAL_PRECISIONS` (:func:`mixed_precision`).

    Returns:
        one ``{"accuracy", "loss", "train_loss", "class_accuracy"}`` per member, as
        :func:`train_and_evaluate`.
    """
    k = len(nets)
    if k < 1:
        raise InputError("train_and_evaluate_group: need at least one network")
    if len(generators) != k:
        raise InputError(f"train_and_evaluate_group: {len(generators)} generators for {k} nets")
    if epochs < 1 or batch_size < 1:
        raise InputError(f"train_and_evaluate_group: epochs and batch_size must be >= 1, got "
                         f"{epochs} and {batch_size}")
    if not float(lr) > 0:
        raise InputError(
            f"train_and_evaluate_group: lr must be > 0, got {lr} (a learned syn_lr that went "
            "negative means distillation diverged)"
        )
    aug_gens = list(generators if augment_generators is None else augment_generators)
    if len(aug_gens) != k:
        raise InputError(f"train_and_evaluate_group: {len(aug_gens)} augment generators for "
                         f"{k} nets")
    dev = _device_of(nets[0])
    rows = _is_rows(images)
    shared = isinstance(images, Tensor) or rows
    if shared != isinstance(labels, Tensor):
        raise InputError("train_and_evaluate_group: images and labels must both be shared "
                         "tensors or both per-member sequences")
    if shared:
        x_all = images if rows else images.detach().to(dev)
        y_all = labels.detach().to(dev)
    else:
        if len(images) != k or len(labels) != k:
            raise InputError(f"train_and_evaluate_group: {len(images)} training sets for {k} "
                             "nets")
        x_all = torch.stack([t.detach() for t in images]).to(dev)
        y_all = torch.stack([t.detach() for t in labels]).to(dev)
    n = int(x_all.shape[0 if shared else 1])
    if int(y_all.shape[0 if shared else 1]) != n:
        raise InputError(f"training data: {n} images but {y_all.shape[0 if shared else 1]} labels")
    group = StackedNetworks(nets, backend=backend).to(dev)
    lr = float(lr)
    decay = resolve_decay_epoch(epochs, lr_decay_epoch)

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(group.parameters(), lr=rate, momentum=momentum,
                               weight_decay=weight_decay)

    opt = make_optimizer(lr)
    train_loss = torch.full((k,), float("nan"))
    autocast, scaler = mixed_precision(precision, dev)
    with torch.enable_grad(), autocast:
        for epoch in range(epochs):
            if decay is not None and epoch == decay:
                opt = make_optimizer(lr_at_epoch(lr, epoch, decay))
            group.train()
            perm = torch.stack([
                torch.randperm(n, generator=g, device=g.device).to(dev) for g in generators])
            perm_rows = perm.cpu() if rows else None
            total = torch.zeros(k, device=dev)
            for i in range(0, n, batch_size):
                idx = perm[:, i : i + batch_size]
                if rows:  # a row source: this step's K x b rows, gathered now
                    part = perm_rows[:, i : i + batch_size]
                    x = x_all[part.flatten()].unflatten(0, tuple(part.shape)).to(dev)
                else:
                    x = gather_members(x_all, idx, shared)
                y = gather_members(y_all, idx, shared)
                if augment is not None:
                    x = augment_members(augment, x, aug_gens)
                losses = member_losses(group(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses.sum()).backward()
                scaler.step(opt)
                scaler.update()
                total += losses.detach() * int(idx.shape[1])
            train_loss = total.cpu().double() / n  # as the plain loop: float(total) / n
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    with autocast:
        accs, test_losses, per_class = _test_group(group, test_images, test_labels,
                                                   test_batch_size)
    return [{"accuracy": a, "loss": tl, "train_loss": float(t), "class_accuracy": pc}
            for a, tl, t, pc in zip(accs, test_losses, train_loss.tolist(), per_class,
                                    strict=True)]


@torch.no_grad()
def _test_group(group: StackedNetworks, images: Tensor, labels: Tensor, batch_size: int
                ) -> tuple[list[float], list[float], list[list[float | None]]]:
    """Per-member (accuracy, mean cross-entropy, per-class accuracy) of a group in eval
    mode."""
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"test data: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise InputError("test data is empty")
    dev = group.stacked[0].device
    group.eval()
    k = group.members
    correct = torch.zeros(k, dtype=torch.long, device=dev)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
    per_class = support = None
    n = int(images.shape[0])
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size].to(dev)
        y = labels[i : i + batch_size].to(dev).long()
        out = group.forward_shared(x)  # [K, b, classes]
        hit = out.argmax(2) == y.unsqueeze(0)
        correct += hit.sum(dim=1)
        ce = F.cross_entropy(out.flatten(0, 1), y.repeat(k), reduction="none")
        loss_sum += ce.view(k, -1).sum(dim=1).double()
        c = int(out.shape[2])
        hits = torch.stack([torch.bincount(y[h], minlength=c) for h in hit])
        seen = torch.bincount(y, minlength=c)
        per_class = hits if per_class is None else per_class + hits
        support = seen if support is None else support + seen
    assert per_class is not None and support is not None
    classes = [class_accuracies(row, support.tolist()) for row in per_class.tolist()]
    return ([int(c) / n for c in correct.tolist()], [float(s) / n for s in loss_sum.tolist()],
            classes)


#: runs (or experts) trained as one vectorised model by default; chosen by measurement
#: (benchmarks/RESULTS.md, "Training K networks as one")
DEFAULT_GROUP_SIZE = 8

#: On a CPU a group pays only while a member's step is small: images per batch x pixels
#: per image at most this. Measured on 2 cores (benchmarks/HISTORY.md, "A third
#: backend, `loop`" and "Contiguous memory and matmul pooling for the grouped
#: backend"), groups of 8 evaluation runs (the backend ``"auto"`` picks,
#: functional/batched.py) gain 2.3x, 1.8x and 1.4x on digits ipc 1 / 10 / 50 (640 /
#: 6400 / 16384 pixels, grouped) and 1.05-1.23x on Fashion-MNIST ipc 1 (7840, loop);
#: they break even on Fashion-MNIST ipc 10 (78400: 0.93-1.00x) and lose on
#: Fashion-MNIST ipc 50 (200704: 0.75-0.78x), where the members' activations no longer
#: fit the caches.
CPU_GROUP_MAX_PIXELS = 32768


def auto_group_size(device: torch.device | str, batch: int, image_shape: Sequence[int]) -> int:
    """The group size ``group_size: null`` resolves to: :data:`DEFAULT_GROUP_SIZE` on an
    accelerator; on a CPU the same while ``batch x H x W`` is at most
    :data:`CPU_GROUP_MAX_PIXELS`, else 1 (one at a time)."""
    if torch.device(device).type != "cpu":
        return DEFAULT_GROUP_SIZE
    pixels = int(batch) * int(np.prod([int(s) for s in image_shape[-2:]]))
    return DEFAULT_GROUP_SIZE if pixels <= CPU_GROUP_MAX_PIXELS else 1


@dataclass(frozen=True)
class EvalProtocol:
    """The training protocol of docs/method.md, 'Evaluation protocol' (defaults: the published one).

    The one place for the settings shared by :class:`~lightning_distill.modules.EvalModule`,
    :func:`~lightning_distill.modules.evaluate_synthetic` and
    :class:`~lightning_distill.callbacks.PeriodicEvaluation`:

    - ``epochs`` (1000), ``batch_size`` (256 MTT / 128 DATM);
    - ``lr``: ``None`` means the synthetic set's learned lr;
    - ``momentum`` 0.9, ``weight_decay`` 5e-4, ``lr_decay_epoch`` (default
      ``epochs // 2``, :func:`resolve_decay_epoch`);
    - ``dsa``, ``dsa_strategy`` (``None``: DSA's default, the strategy of MTT / FTD /
      DATM), ``dsa_flip`` (``None``: dropped for digit data sets), turned into an
      augmenter by :func:`lightning_distill.data.augment.make_dsa`;
    - ``group_size``: how many runs train together as one vectorised model
      (:func:`train_and_evaluate_group`); 1 trains them one at a time; ``None`` (the
      default) chooses by device and step size (:meth:`group_size_for`);
    - ``precision``: one of :data:`EVAL_PRECISIONS`; ``None`` (the default) follows the
      Trainer that runs the evaluation (:meth:`for_trainer`), float32 without one.
    """

    epochs: int = 1000
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_epoch: int | None = None
    dsa: bool = True
    dsa_strategy: str | None = None
    dsa_flip: bool | None = None
    group_size: int | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in EVAL_PRECISIONS:
            raise InputError(f"EvalProtocol: precision must be one of {EVAL_PRECISIONS} or "
                             f"null (the Trainer's), got {self.precision!r}")
        if int(self.epochs) < 1:
            raise InputError(f"EvalProtocol: epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise InputError(f"EvalProtocol: batch_size must be >= 1, got {self.batch_size}")
        if self.group_size is not None and int(self.group_size) < 1:
            raise InputError(f"EvalProtocol: group_size must be >= 1 or null (chosen by "
                             f"device and step size), got {self.group_size}")

    def for_trainer(self, precision: Any) -> EvalProtocol:
        """This protocol in a Trainer's ``precision`` where ``precision`` is unset: a mixed
        precision carries over, any other evaluates in float32 (the protocol's networks
        are float32)."""
        if self.precision is not None or precision is None:
            return self
        name = str(precision)
        return dataclasses.replace(self, precision=name if name in _MIXED else "32-true")

    def group_size_for(self, device: torch.device | str, num_images: int,
                       image_shape: Sequence[int]) -> int:
        """The runs trained together on ``device`` for a training set of ``num_images``
        images of ``image_shape``: ``group_size``, or when it is None
        :func:`auto_group_size` at the step's batch (``min(batch_size, num_images)``)."""
        if self.group_size is not None:
            return int(self.group_size)
        return auto_group_size(device, min(int(self.batch_size), int(num_images)), image_shape)

    @classmethod
    def resolve(cls, protocol: EvalProtocol | None, overrides: Mapping[str, Any],
                where: str) -> EvalProtocol:
        """``protocol`` (default: the published one) with the keyword ``overrides``
        (field names of this class) applied; unknown keywords raise ``TypeError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputTypeError(f"{where}: unknown keyword(s) {unknown}; the evaluation protocol "
                                 f"takes {sorted(names)}")
        base = protocol if protocol is not None else cls()
        return dataclasses.replace(base, **dict(overrides)) if overrides else base

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as a dict of field values."""
        return dataclasses.asdict(self)

    def train_runs(
        self,
        model: str,
        model_kwargs: Mapping[str, Any],
        seeds: Sequence[int],
        images: Tensor | Sequence[Tensor],
        labels: Tensor | Sequence[Tensor],
        **kwargs: Any,
    ) -> list[float]:
        """Test accuracies of one fresh ``model`` per run seed, trained with this protocol:
        the ``"accuracy"`` of each of :meth:`train_runs_results` (same arguments)."""
        return [r["accuracy"] for r in self.train_runs_results(
            model, model_kwargs, seeds, images, labels, **kwargs)]

    def train_runs_results(
        self,
        model: str,
        model_kwargs: Mapping[str, Any],
        seeds: Sequence[int],
        images: Tensor | Sequence[Tensor],
        labels: Tensor | Sequence[Tensor],
        *,
        set_lr: float,
        num_classes: int,
        test_images: Tensor,
        test_labels: Tensor,
        test_batch_size: int = 1024,
        device: torch.device | str = "cpu",
        augment: Callable[..., Tensor] | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> list[dict[str, Any]]:
        """One fresh ``model`` per run seed, trained with this protocol and tested: one
        :func:`train_and_evaluate` result dict per run (``accuracy``, ``loss``,
        ``train_loss``, ``class_accuracy``), in the order of ``seeds``.

        Run ``s``'s network init, batch order and DSA draws derive from ``s``
        (:func:`run_seeds`); the runs train ``group_size`` (:meth:`group_size_for`) at
        a time as one vectorised model (a group of one uses the plain loop,
        :func:`train_and_evaluate`).
        ``images``/``labels``: one training set for all runs, or one per run (sequences
        aligned with ``seeds``). ``set_lr`` is used when ``lr`` is None.
        ``on_progress(runs)`` is called after every epoch with the runs' worth of work it
        finished (a group of K runs over E epochs: K / E each epoch), for a progress bar.
        """
        device = torch.device(device)
        lr = set_lr if self.lr is None else self.lr
        shared = isinstance(images, Tensor) or _is_rows(images)
        if not shared and len(images) != len(seeds):
            raise InputError(f"train_runs: {len(images)} training sets for {len(seeds)} runs")
        first = images if shared else images[0]
        channels, image_size = int(first.shape[1]), tuple(int(s) for s in first.shape[2:])
        results: list[dict[str, Any]] = []
        positions = list(range(len(seeds)))
        for part in chunks(positions, self.group_size_for(device, first.shape[0], first.shape)):
            streams = [run_seeds(seeds[i]) for i in part]
            nets = [seeded_model(model, channels, num_classes, image_size, seed=init,
                                 **dict(model_kwargs)).to(device) for init, _, _ in streams]
            gens = [torch.Generator().manual_seed(shuffle) for _, shuffle, _ in streams]
            dsa_gens = [torch.Generator().manual_seed(dsa) for _, _, dsa in streams]
            share = len(part) / self.epochs  # runs' worth of one epoch of this group
            tick = None if on_progress is None else (
                lambda _epoch, share=share: on_progress(share))
            common = dict(lr=lr, epochs=self.epochs, batch_size=self.batch_size,
                          momentum=self.momentum, weight_decay=self.weight_decay,
                          lr_decay_epoch=self.lr_decay_epoch, augment=augment,
                          test_images=test_images, test_labels=test_labels,
                          test_batch_size=test_batch_size, on_epoch_end=tick,
                          precision=self.precision or "32-true")
            if len(part) == 1:
                x = images if shared else images[part[0]]
                y = labels if shared else labels[part[0]]
                results.append(train_and_evaluate(nets[0], x, y, generator=gens[0],
                                                  augment_generator=dsa_gens[0], **common))
            else:
                x = images if shared else [images[i] for i in part]
                y = labels if shared else [labels[i] for i in part]
                results.extend(train_and_evaluate_group(nets, x, y, generators=gens,
                                                        augment_generators=dsa_gens, **common))
        return results
