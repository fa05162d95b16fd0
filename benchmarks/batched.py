"""Training K networks as one: throughput of groups against one network at a time.

Side by side in one run, for K in ``--ks`` (default 1 2 4 8 16), the ratio

    (member images per second of a group of K) / (images per second of one network)

for the two places where the library trains many small networks:

- ``experts``: the path of ``lightning-distill experts``: ``ExpertTrajectoryModule`` +
  ``Trainer`` + ``GSAM`` (one expert) against ``GroupExpertModule`` + ``Trainer`` + ``GSAM``
  fed by ``MemberBatches`` (K experts as one ``StackedNetworks``), DSA on every batch,
  SGD lr 0.01 (docs/method.md, 'Expert trajectories'; GSAM rho 0.01, alpha 0.3). Scales
  (``--expert-scales``):
  ``digits`` (the quickstart's ConvNet width 32 depth 2 on 1x8x8, batch 32),
  ``mnist`` (ConvNet-3 width 128 on 1x28x28, batch 256), ``cifar`` (ConvNet-3 width 128
  on 3x32x32, batch 256).
- ``eval``: the evaluation protocol (docs/method.md, 'Evaluation protocol': SGD momentum 0.9,
weight decay 5e-4,
  DSA, batch 256): ``train_and_evaluate`` (one run) against
  ``train_and_evaluate_group`` (K runs), on synthetic sets of ipc 1, 10 and 50
  (``--ipcs``) at the ``--eval-scale`` (``digits`` or ``cifar``).

Random data of the right shapes (throughput does not depend on the pixel values).
``--backends`` adds the ``vmap`` and ``loop`` backends next to the default ``grouped`` one
(the measurement behind the choice), and ``grouped-cl``: the grouped backend in
channels-last memory format (``StackedNetworks(channels_last=True)``, its default before
2026-12-03). Cases are interleaved over ``--repeats`` and the table gives the median
ratio (and the best): on a shared machine the ratio of two timings taken next to each
other is steadier than either.

Examples::

    python benchmarks/batched.py --device cuda                         # GPU defaults
    OMP_NUM_THREADS=2 python benchmarks/batched.py --device cpu --cpu-quick
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import platform
import statistics
import subprocess
import time
import warnings
from unittest import mock

import pytorch_lightning as pl
import torch

# the sibling script (its folder is on sys.path when this one runs): one timer for both
from experts import _sync, _Timer

from lightning_distill.callbacks.sharpness import GSAM
from lightning_distill.data.augment import DSA
from lightning_distill.data.datamodule import MemberBatches, TensorBatchLoader
from lightning_distill.functional.batched import StackedNetworks
from lightning_distill.functional.evaluation import (
    seeded_model,
    train_and_evaluate,
    train_and_evaluate_group,
)
from lightning_distill.modules.evaluate import trainer_device_args
from lightning_distill.modules.expert import ExpertTrajectoryModule, GroupExpertModule

RHO, ALPHA, LR = 0.01, 0.3, 0.01

#: name -> (channels, image size, width, depth, batch)
SCALES = {
    "digits": (1, 8, 32, 2, 32),
    "mnist": (1, 28, 128, 3, 256),
    "cifar": (3, 32, 128, 3, 256),
    # the Fashion-MNIST CPU benchmark's networks (recipes/fashion_mnist_cpu/run.yaml)
    "fmnist32": (1, 28, 32, 3, 256),
}




def _backend(name: str) -> tuple[str, contextlib.AbstractContextManager]:
    """The library backend of a ``--backends`` name, and the context to run it in:
    ``grouped-cl`` is ``grouped`` with every group built with ``channels_last=True``."""
    if name != "grouped-cl":
        return name, contextlib.nullcontext()
    return "grouped", mock.patch.object(
        StackedNetworks, "__init__",
        functools.partialmethod(StackedNetworks.__init__, channels_last=True))


def _fit(module, loader, device, steps, warmup) -> float:
    timer = _Timer(warmup, device)
    trainer = pl.Trainer(
        **trainer_device_args(device), max_steps=warmup + steps,
        callbacks=[timer, GSAM(rho=RHO, alpha=ALPHA)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, loader)
    return timer.end - timer.start


def expert_case(scale: str, k: int | None, device, steps, warmup, backend) -> float:
    """Member images per second: one expert (``k`` None) or a group of ``k``."""
    backend, context = _backend(backend)
    with context:
        return _expert_case(scale, k, device, steps, warmup, backend)


def _expert_case(scale: str, k: int | None, device, steps, warmup, backend) -> float:
    c, s, width, depth, batch = SCALES[scale]
    n = batch * (warmup + steps)  # one epoch holds every step
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    common = dict(model="ConvNet", channels=c, num_classes=10, image_size=s,
                  model_kwargs={"width": width, "depth": depth}, lr=LR, dsa=True,
                  dsa_flip=c == 3)
    if k is None:
        torch.manual_seed(1)
        module = ExpertTrajectoryModule(**common, dsa_seed=2)
        loader = TensorBatchLoader(x, y, batch, shuffle=True,
                                   generator=torch.Generator().manual_seed(3))
        members = 1
    else:
        module = GroupExpertModule(**common, init_seeds=range(k), dsa_seeds=range(k),
                                   backend=backend)
        loader = MemberBatches([TensorBatchLoader(
            x, y, batch, shuffle=True, generator=torch.Generator().manual_seed(3 + i))
            for i in range(k)])
        members = k
    t = _fit(module, loader, device, steps, warmup)
    return members * batch * steps / t


def eval_case(scale: str, ipc: int, k: int | None, device, epochs, backend) -> float:
    """Member images per second of evaluation training (epochs x set size / time)."""
    backend, context = _backend(backend)
    with context:
        return _eval_case(scale, ipc, k, device, epochs, backend)


def _eval_case(scale: str, ipc: int, k: int | None, device, epochs, backend) -> float:
    c, s, width, depth, _ = SCALES[scale]
    n = 10 * ipc
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    tx = torch.randn(256, c, s, s, generator=g).to(device)
    ty = torch.randint(0, 10, (256,), generator=g).to(device)
    dsa = DSA(flip=c == 3)
    members = 1 if k is None else k
    nets = [seeded_model("ConvNet", c, 10, s, seed=i, width=width, depth=depth).to(device)
            for i in range(members)]
    common = dict(lr=LR, epochs=epochs, batch_size=256, augment=dsa, test_images=tx,
                  test_labels=ty)
    _sync(device)
    start = time.perf_counter()
    if k is None:
        train_and_evaluate(nets[0], x, y, generator=torch.Generator().manual_seed(1),
                           augment_generator=torch.Generator().manual_seed(2), **common)
    else:
        train_and_evaluate_group(
            nets, x, y, generators=[torch.Generator().manual_seed(1 + i) for i in range(k)],
            augment_generators=[torch.Generator().manual_seed(2 + i) for i in range(k)],
            backend=backend, **common)
    _sync(device)
    return members * n * epochs / (time.perf_counter() - start)


def _table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _ratios(single: list[float], group: list[float]) -> tuple[float, float]:
    r = [g / s for s, g in zip(single, group, strict=True)]
    return statistics.median(r), max(r)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--expert-scales", nargs="*", default=["digits", "mnist", "cifar"],
                   choices=sorted(SCALES))
    p.add_argument("--big-ks", type=int, nargs="+", default=None,
                   help="K values for the mnist / cifar expert scales (default: --ks)")
    p.add_argument("--steps", type=int, default=20, help="timed expert steps (digits)")
    p.add_argument("--big-steps", type=int, default=10, help="timed steps (mnist, cifar)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-scale", default="digits", choices=sorted(SCALES))
    p.add_argument("--ipcs", type=int, nargs="*", default=[1, 10, 50],
                   help="evaluation set sizes (none: skip the evaluation table)")
    p.add_argument("--epochs", type=int, default=40, help="evaluation epochs per case")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["grouped"],
                   choices=["grouped", "grouped-cl", "vmap", "loop"])
    p.add_argument("--cpu-quick", action="store_true",
                   help="CPU settings that fit in ~10 minutes on 2 cores: big scales at "
                        "K = 1, 2, 4 with 2 timed steps, 1 warm-up, 2 repeats")
    args = p.parse_args(argv)
    if args.cpu_quick:
        args.big_ks = args.big_ks or [1, 2, 4]
        args.big_steps, args.warmup, args.repeats = 2, 1, 2
        args.steps, args.epochs = 12, 20
    big_ks = args.big_ks or args.ks
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = torch.device(args.device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# Training K networks as one ({datetime.date.today().isoformat()}, commit {commit})")
    print(f"device {args.device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; repeats {args.repeats}; DSA on; experts: GSAM, "
          f"{args.steps} timed steps (mnist/cifar {args.big_steps}) after {args.warmup} warm-up; "
          f"eval: {args.epochs} epochs, batch 256, momentum 0.9")

    header = ("scale", "backend", "K", "one at a time img/s", "group img/s (all members)",
              "ratio (median)", "ratio (best)")
    for scale in args.expert_scales:
        rows = []
        big = scale != "digits"
        ks = big_ks if big else args.ks
        steps = args.big_steps if big else args.steps
        single: list[float] = []
        groups: dict[tuple[str, int], list[float]] = {(b, k): [] for b in args.backends
                                                      for k in ks}
        for _ in range(args.repeats):
            single.append(expert_case(scale, None, device, steps, args.warmup, "grouped"))
            for b in args.backends:
                for k in ks:
                    groups[(b, k)].append(expert_case(scale, k, device, steps, args.warmup, b))
        c, s, width, depth, batch = SCALES[scale]
        for (b, k), v in groups.items():
            med, best = _ratios(single, v)
            rows.append((f"{scale} ({c}x{s}x{s}, ConvNet-{width}-D{depth}, batch {batch})", b,
                         str(k), f"{statistics.median(single):.0f}", f"{statistics.median(v):.0f}",
                         f"{med:.2f}", f"{best:.2f}"))
        _table(f"Experts, {scale} (GSAM + DSA, the experts stage's Lightning path): member "
               "images/s", rows, header)
        print(flush=True)

    c, s, width, depth, _ = SCALES[args.eval_scale]
    for ipc in args.ipcs:
        rows = []
        single = []
        groups = {(b, k): [] for b in args.backends for k in args.ks}
        for _ in range(args.repeats):
            single.append(eval_case(args.eval_scale, ipc, None, device, args.epochs, "grouped"))
            for b in args.backends:
                for k in args.ks:
                    groups[(b, k)].append(eval_case(args.eval_scale, ipc, k, device, args.epochs,
                                                    b))
        for (b, k), v in groups.items():
            med, best = _ratios(single, v)
            rows.append((f"ipc {ipc} ({10 * ipc} images)", b, str(k),
                         f"{statistics.median(single):.0f}", f"{statistics.median(v):.0f}",
                         f"{med:.2f}", f"{best:.2f}"))
        _table(f"Evaluation runs, ipc {ipc} ({args.eval_scale}: {c}x{s}x{s}, "
               f"ConvNet-{width}-D{depth}, the protocol of docs/method.md, 'Evaluation "
               "protocol'): member images/s", rows,
               ("set", "backend", "K", "one at a time img/s", "group img/s (all members)",
                "ratio (median)", "ratio (best)"))
        print(flush=True)


if __name__ == "__main__":
    main()
