"""The evaluation protocol as a plain torch loop (REFERENCE section 6; no Lightning).

A synthetic set is worth the test accuracy of fresh networks trained on it:

- SGD, momentum 0.9, weight decay 5e-4, lr = the learned alpha (syn_lr);
- ``epochs`` epochs (1000) of shuffled minibatches (``batch_size`` 256 MTT / 128 DATM,
  last partial batch kept), DSA on every batch;
- at the start of epoch ``lr_decay_epoch`` (default ``epochs // 2``) the lr becomes
  0.1 x lr and the optimizer is RE-CREATED, so its momentum buffers restart at zero
  (as the reference does);
- loss: cross-entropy for hard labels, soft cross-entropy
  ``mean_b sum_k -log_softmax(out)_bk softmax(Y)_bk`` for soft labels (REFERENCE 5.2);
- one test at the end, ``net.eval()`` under ``no_grad``, on data that is ALREADY in the
  synthetic set's input space (normalised or ZCA whitened): nothing is transformed here.

Mean +- std over K networks: :func:`summarize` (population std, as the papers' ``np.std``).

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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import classification_loss

__all__ = [
    "DEFAULT_DSA_STRATEGY",
    "evaluate_accuracy",
    "lr_at_epoch",
    "make_dsa",
    "resolve_decay_epoch",
    "run_seeds",
    "seeded_model",
    "summarize",
    "train_and_evaluate",
]


DEFAULT_DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def make_dsa(
    dataset: str | None,
    dsa: bool = True,
    strategy: str = DEFAULT_DSA_STRATEGY,
    flip: bool | None = None,
) -> Any:
    """The evaluation's DSA (REFERENCE 3), or None when ``dsa`` is False.

    ``flip=None`` follows the data set: flip is dropped for digit data sets
    (:meth:`DSA.for_dataset`) and kept otherwise (also when ``dataset`` is unknown).
    """
    from ..data.augment import DSA

    if not dsa:
        return None
    if flip is None:
        return DSA.for_dataset(str(dataset or ""), strategy)
    return DSA(strategy, flip=flip)


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
        raise ValueError("summarize: no accuracies given (run at least one network)")
    return float(a.mean()), float(a.std())


def _device_of(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def _test(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``net`` in eval mode; counts are exact integers."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"test data: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("test data is empty")
    dev = _device_of(net)
    net.eval()
    correct = 0
    loss_sum = 0.0
    n = int(images.shape[0])
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size].to(dev)
        y = labels[i : i + batch_size].to(dev).long()
        out = net(x)
        correct += int((out.argmax(1) == y).sum().item())
        loss_sum += float(F.cross_entropy(out, y, reduction="sum").item())
    return correct / n, loss_sum / n


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
) -> dict[str, float]:
    """Train ``net`` on (images, labels) with the protocol of REFERENCE 6, then test once.

    Args:
        net: a freshly initialised network (trained in place, on its own device).
        images, labels: the training set ([N] class ids or [N, K] soft-label logits);
            detached, so a synthetic set's autograd graph is never touched.
        lr: initial learning rate (the synthetic set's learned alpha).
        lr_decay_epoch: the lr is multiplied by 0.1 at the start of this epoch by
            re-creating the SGD optimizer (momentum restarts); see
            :func:`resolve_decay_epoch`.
        augment: DSA-like callable ``augment(x, generator=...)`` applied to every batch.
        generator: draws each epoch's batch order (``torch.randperm``).
        augment_generator: passed to ``augment``; defaults to ``generator``.
        test_images, test_labels: the test (or validation) split, in the same input space.
        on_epoch_start: optional hook ``f(epoch, optimizer)`` called before each epoch
            (for instrumentation).

    Returns:
        ``{"accuracy", "loss"}`` on the test data and ``"train_loss"``, the mean training
        loss of the last epoch.
    """
    if epochs < 1:
        raise ValueError(f"train_and_evaluate: epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"train_and_evaluate: batch_size must be >= 1, got {batch_size}")
    if not float(lr) > 0:
        raise ValueError(
            f"train_and_evaluate: lr must be > 0, got {lr} (a learned syn_lr that went "
            "negative means distillation diverged)"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"training data: {images.shape[0]} images but {labels.shape[0]} labels")
    dev = _device_of(net)
    x_all = images.detach().to(dev)
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
    with torch.enable_grad():
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
            perm = perm.to(dev)
            total = torch.zeros((), device=dev)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                x, y = x_all[idx], y_all[idx]
                if augment is not None:
                    x = augment(x, generator=augment_generator)
                loss = classification_loss(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * int(idx.numel())
            train_loss = float(total) / n
    acc, test_loss = _test(net, test_images, test_labels, test_batch_size)
    return {"accuracy": acc, "loss": test_loss, "train_loss": train_loss}
