"""Expert-training throughput (images/s): our stack against a reference-style PyTorch loop.

Side by side in one run, on the same model, batch and data shapes (default: CIFAR-shaped
random data 3x32x32, 10 classes, ConvNet-3 width 128 with instance norm, batch 256,
SGD lr 0.01, DSA on every batch), for plain SGD and for GSAM (rho 0.01, alpha 0.3,
adaptive; docs/method.md, 'Flat experts (FTD, GSAM)'):

- ``ours``: the library path the ``experts`` stage runs: ``ExpertTrajectoryModule`` +
  ``pytorch_lightning.Trainer`` (+ the ``GSAM`` callback), fed by ``RealDataModule``'s
  default ``"batched"`` loader (``TensorBatchLoader``: one ``index_select`` per batch from
  the CPU tensors, pinned when CUDA is available, seeded shuffle), DSA on the batch's device with
  its per-sample parameters drawn from a CPU generator. No logger, progress bar or
  checkpointing (the stage adds TensorBoard every 10 steps).
- ``reference``: a plain loop written here the way the public MTT/FTD/DATM expert
  scripts do it: CPU ``TensorDataset``, ``DataLoader`` without workers, ``.to(device)`` per
  batch, a DSA that draws its family with numpy, builds the affine matrices of scale and
  rotate per sample as Python lists on the CPU and computes the sampling grid there
  before moving it to the device, and (GSAM) an optimizer wrapper looping over the
  parameters for the perturbation, the gradient decomposition and the restore.

Throughput = batch x timed steps / wall time of the timed steps (after ``--warmup``
steps; CUDA is synchronised at both ends). Cases are interleaved over ``--repeats``;
the table gives the best and the median. ``--check`` first verifies, with DSA off and a
fixed batch order, that both GSAM implementations take the same steps (max |dw|).

Examples::

    python benchmarks/experts.py --device cuda                   # CIFAR shapes, batch 256
    OMP_NUM_THREADS=2 python benchmarks/experts.py --device cpu --batch-size 64 \\
        --steps 4 --warmup 1 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import math
import platform
import statistics
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.callbacks.sharpness import GSAM
from lightning_distill.data.datamodule import TensorBatchLoader
from lightning_distill.modules.evaluate import trainer_device_args
from lightning_distill.modules.expert import ExpertTrajectoryModule

RHO, ALPHA, LR = 0.01, 0.3, 0.01


# --------------------------------------------------------------- reference-style DSA
class ReferenceDSA:
    """DSA as the reference repositories implement it: one family per call (numpy RNG),
    affine matrices as per-sample Python lists on the CPU, grid built on the CPU."""

    def __init__(self, flip: bool = True) -> None:
        self.families = ["color", "crop", "cutout", "scale", "rotate"] + (["flip"] if flip
                                                                           else [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        family = self.families[np.random.randint(len(self.families))]
        return getattr(self, family)(x)

    @staticmethod
    def _affine(x: torch.Tensor, theta: list) -> torch.Tensor:
        theta_cpu = torch.tensor(theta, dtype=torch.float)  # built on the CPU every call
        grid = F.affine_grid(theta_cpu, list(x.shape), align_corners=True).to(x.device)
        return F.grid_sample(x, grid, align_corners=True)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        r = 1.2
        sx = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
        sy = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
        theta = [[[float(sx[i]), 0.0, 0.0], [0.0, float(sy[i]), 0.0]] for i in range(x.shape[0])]
        return self._affine(x, theta)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        angle = (torch.rand(x.shape[0]) - 0.5) * 2 * 15.0 / 180 * math.pi
        theta = [[[math.cos(a), math.sin(-a), 0.0], [math.sin(a), math.cos(a), 0.0]]
                 for a in angle.tolist()]
        return self._affine(x, theta)

    @staticmethod
    def flip(x: torch.Tensor) -> torch.Tensor:
        mask = torch.rand(x.size(0), 1, 1, 1, device=x.device)
        return torch.where(mask < 0.5, x.flip(3), x)

    @staticmethod
    def color(x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        x = x + (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) * 2.0) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - m) * (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + m

    @staticmethod
    def crop(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        tx = torch.randint(-sh, sh + 1, size=[n, 1, 1], device=x.device)
        ty = torch.randint(-sw, sw + 1, size=[n, 1, 1], device=x.device)
        b, gx, gy = torch.meshgrid(torch.arange(n, device=x.device),
                                   torch.arange(h, device=x.device),
                                   torch.arange(w, device=x.device), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, h + 1)
        gy = torch.clamp(gy + ty + 1, 0, w + 1)
        padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        return padded.permute(0, 2, 3, 1).contiguous()[b, gx, gy].permute(0, 3, 1, 2)

    @staticmethod
    def cutout(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        ox = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1], device=x.device)
        oy = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1], device=x.device)
        b, gx, gy = torch.meshgrid(torch.arange(n, device=x.device),
                                   torch.arange(ch, device=x.device),
                                   torch.arange(cw, device=x.device), indexing="ij")
        gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
        gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
        mask[b, gx, gy] = 0
        return x * mask.unsqueeze(1)


# -------------------------------------------------------------- reference-style GSAM
class ReferenceGSAM:
    """GSAM as an optimizer wrapper, per-parameter Python loops (the reference's style)."""

    def __init__(self, params, base: torch.optim.Optimizer, rho: float, alpha: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.base, self.rho, self.alpha = base, rho, alpha
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {p: {} for p in self.params}

    def step(self, closure) -> torch.Tensor:
        self.base.zero_grad()
        loss = closure()
        loss.backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([
                (torch.abs(p) * p.grad).norm(p=2) for p in self.params if p.grad is not None]),
                p=2)
            for p in self.params:
                if p.grad is None:
                    continue
                self.state[p]["old_g"] = p.grad.clone()
                e_w = torch.pow(p, 2) * p.grad * self.rho / (norm + 1e-12)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        self.base.zero_grad()
        closure().backward()
        with torch.no_grad():
            inner = sum(torch.sum(self.state[p]["old_g"] * p.grad) for p in self.params
                        if p.grad is not None)
            new_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params
                                               if p.grad is not None]), p=2)
            old_norm = torch.norm(torch.stack([self.state[p]["old_g"].norm(p=2)
                                               for p in self.params if p.grad is not None]), p=2)
            cosine = inner / (new_norm * old_norm + 1e-12)
            for p in self.params:
                if p.grad is None:
                    continue
                vertical = self.state[p]["old_g"] - cosine * old_norm * p.grad / (new_norm
                                                                                   + 1e-12)
                p.grad.add_(vertical, alpha=-self.alpha)
                p.sub_(self.state[p]["e_w"])
        self.base.step()
        return loss


def reference_loop(net, loader, device, steps, warmup, gsam, dsa) -> float:
    """Train ``warmup + steps`` steps the reference way; seconds of the timed steps."""
    criterion = torch.nn.CrossEntropyLoss().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0, weight_decay=0)
    sam = ReferenceGSAM(net.parameters(), opt, RHO, ALPHA) if gsam else None
    net.train()
    done, start = 0, None
    while done < warmup + steps:
        for img, lab in loader:
            if done == warmup:
                _sync(device)
                start = time.perf_counter()
            img, lab = img.to(device), lab.to(device)
            if dsa is not None:
                img = dsa(img)
            if sam is None:
                loss = criterion(net(img), lab)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                sam.step(lambda img=img, lab=lab: criterion(net(img), lab))
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------- our stack
class _Timer(Callback):
    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(self.device)
        self.end = time.perf_counter()


def our_stack(module, loader, device, steps, warmup, gsam) -> float:
    timer = _Timer(warmup, device)
    callbacks = [timer] + ([GSAM(rho=RHO, alpha=ALPHA)] if gsam else [])
    trainer = pl.Trainer(
        **trainer_device_args(device), max_steps=warmup + steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    return timer.end - timer.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-images", type=int, default=10240, help="random training images")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--no-dsa", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the GSAM equivalence check")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device(args.device)
    torch.manual_seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.num_images, args.channels, args.image_size, args.image_size,
                    generator=gen)
    y = torch.randint(0, args.num_classes, (args.num_images,), generator=gen)
    dataset = TensorDataset(x, y)
    model_kw = dict(model=args.model, channels=args.channels, num_classes=args.num_classes,
                    image_size=args.image_size, model_kwargs={"width": args.width,
                                                               "depth": args.depth}
                    if args.model == "ConvNet" else {})

    def fresh_module(dsa: bool) -> ExpertTrajectoryModule:
        torch.manual_seed(1)
        return ExpertTrajectoryModule(**model_kw, lr=LR, dsa=dsa, dsa_seed=2)

    def loader(shuffle: bool = True, batch: int | None = None) -> DataLoader:
        """The reference's loader: per-sample indexing and collation, no workers."""
        return DataLoader(dataset, batch_size=batch or args.batch_size, shuffle=shuffle,
                          num_workers=0)

    def our_loader(shuffle: bool = True, batch: int | None = None) -> TensorBatchLoader:
        """What ``RealDataModule(loader="batched").train_dataloader()`` returns."""
        return TensorBatchLoader(x, y, batch or args.batch_size, shuffle=shuffle,
                                 generator=torch.Generator().manual_seed(0))

    check = None
    if not args.no_check:  # same algorithm: 2 GSAM steps, DSA off, fixed order
        small = min(args.batch_size, 32)
        ours = fresh_module(False)
        ref_net = copy.deepcopy(ours.net).to(device)
        our_stack(ours, our_loader(False, small), device, 2, 0, gsam=True)
        reference_loop(ref_net, loader(False, small), device, 2, 0, gsam=True, dsa=None)
        check = max((a.detach().cpu() - b.detach().cpu()).abs().max().item()
                    for a, b in zip(ours.net.parameters(), ref_net.parameters(), strict=True))

    cases = [(impl, opt) for opt in ("SGD", "GSAM") for impl in ("reference", "ours")]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for _ in range(args.repeats):
        for impl, opt in cases:
            gsam = opt == "GSAM"
            module = fresh_module(not args.no_dsa)
            if impl == "ours":
                t = our_stack(module, our_loader(), device, args.steps, args.warmup, gsam)
            else:
                net = module.net.to(device)
                dsa = None if args.no_dsa else ReferenceDSA()
                t = reference_loop(net, loader(), device, args.steps, args.warmup, gsam, dsa)
            times[(impl, opt)].append(t)

    ips = {c: [args.steps * args.batch_size / t for t in ts] for c, ts in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# Expert training throughput ({datetime.date.today().isoformat()})")
    print(f"device {args.device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.model} width {args.width} depth "
          f"{args.depth}, data {args.channels}x{args.image_size}x{args.image_size}, "
          f"{args.num_classes} classes, batch {args.batch_size}, DSA {not args.no_dsa}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats")
    if check is not None:
        print(f"GSAM check (2 steps, no DSA): max |w_ours - w_reference| = {check:.2e}")
    print()
    print("| optimizer | implementation | images/s (best) | images/s (median) "
          "| / reference (best) | / reference (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for impl, opt in cases:
        best, med = max(ips[(impl, opt)]), statistics.median(ips[(impl, opt)])
        ref_best = max(ips[("reference", opt)])
        ref_med = statistics.median(ips[("reference", opt)])
        print(f"| {opt} | {impl} | {best:.1f} | {med:.1f} | {best / ref_best:.2f} "
              f"| {med / ref_med:.2f} |")


if __name__ == "__main__":
    main()
