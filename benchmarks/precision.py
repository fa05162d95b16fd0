"""bf16-mixed against float32, and against DATM's own float32 code, side by side (issue 31).

Every variant runs in its own process (one fresh interpreter per measurement), the
variants interleaved over ``--repeats`` rounds, so that a slow phase of the machine
hits all of them alike; the table reports each variant's median and its speed-up over
the reference in the same run.

- ``distill``: one outer iteration (the unroll and its backward; the optimizer steps
  are negligible) at a CIFAR shape (3x32x32, ConvNet width 128 depth 3, 100 synthetic
  images, batch 100, 10 inner steps) and at the Fashion-MNIST benchmark's (1x28x28,
  width 32, 100 images, batch 100, 30 steps): DATM's code as shipped (its
  ``ReparamModule``, ``ConvNet`` and ``DiffAugment`` driven as its ``distill/DATM.py``
  loop does: a list of flat student parameters, ``create_graph`` at every step,
  ``mse_loss(reduction="sum")``; float32), against ``trajectory_matching_loss`` in modes
  full / recompute / tesla, float32 and under bf16 autocast (as a Trainer with
  ``precision="bf16-mixed"`` runs ``training_step`` and ``manual_backward``), with
  learnable soft labels and DSA. ``--channels-last`` adds bf16 variants whose DSA output
  is in channels_last memory format.
- ``expert``: seconds per training batch of an ExpertTrajectoryModule with GSAM in a
  Trainer, ``32-true`` against ``bf16-mixed`` (batch 256, random data of each shape).
- ``evaluate``: an evaluation run (``EvalProtocol.train_runs``: 2 runs, 20 epochs of the
  100-image set, then the test of 2000 images), float32 against bf16-mixed.

A variant ending in ``-heap`` runs in a process whose glibc allocator is tuned as the
library's CLI tunes it in every CPU stage (:mod:`lightning_distill.allocator`: large
blocks from the heap, freed memory kept for reuse); the others run with glibc's defaults.
DATM's code is timed both ways, so its speed-ups can be read against either. Each
process also reports its peak resident memory.

DATM's files are read from ``--datm`` (a checkout of github.com/NUS-HPC-AI-Lab/DATM:
``reparam_module.py``, ``networks.py``, ``utils/utils_baseline.py``); nothing of it is
copied here. Its ``utils_baseline`` imports kornia, which DiffAugment does not use: a
stub stands in for it when it is not installed. Its ConvNet's forward is taken with
``reshape`` for its ``view`` (a 1-channel input's activations can come out of a CPU
convolution in strides that ``view`` refuses); the computation is the same.

    OMP_NUM_THREADS=2 python benchmarks/precision.py --datm /path/to/DATM --repeats 3
    python benchmarks/precision.py --datm /path/to/DATM --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

SHAPES = {  # channels, size, width, depth, images, batch, steps
    "cifar": (3, 32, 128, 3, 100, 100, 10),
    "fashion": (1, 28, 32, 3, 100, 100, 30),
}
# "-heap": the process runs with glibc's allocator tuned as the library's CLI runs every
# CPU stage (lightning_distill/allocator.py: large blocks from the heap, freed memory kept
# for reuse); without it, glibc's defaults. DATM's code is timed both ways.
DISTILL = (["datm", "datm-heap"]
           + [f"{m}-{p}-heap" for m in ("full", "recompute", "tesla") for p in ("fp32", "bf16")]
           + ["full-bf16", "recompute-fp32", "recompute-bf16"])
OTHER = ["fp32", "bf16", "fp32-heap", "bf16-heap"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- workers
def _setup(threads: int | None, seed: int = 0):
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def _clock(step, iters: int, sync) -> dict[str, float]:
    """Median wall and CPU seconds (all threads of the process) of ``iters`` calls of
    ``step`` after one warm-up call. On a loaded machine the CPU seconds are the fairer
    figure (the wall time also counts the time other processes held the cores)."""
    step()
    sync()
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": statistics.median(wall), "cpu": statistics.median(cpu)}


def _problem(torch, shape: str, device):
    c, size, width, depth, n, _, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, c, size, size, generator=g).to(device).requires_grad_(True)
    labels = (2 * torch.randn(n, 10, generator=g)).to(device).requires_grad_(True)
    syn_lr = torch.tensor(0.01, device=device, requires_grad=True)
    return images, labels, syn_lr, width, depth


def worker_distill_datm(args, torch, device, sync) -> float:
    sys.path.insert(0, args.datm)
    try:
        import kornia  # noqa: F401
    except ImportError:
        sys.modules["kornia"] = types.ModuleType("kornia")
    import networks
    from reparam_module import ReparamModule
    from utils.utils_baseline import DiffAugment, ParamDiffAug

    c, size, *_ = SHAPES[args.shape]
    _, _, _, _, _, batch, steps = SHAPES[args.shape]
    images, labels, syn_lr, width, depth = _problem(torch, args.shape, device)
    class ConvNet(networks.ConvNet):
        # DATM's forward with reshape for its view: on a CPU a 1-channel input can come
        # out of the convolutions in channels_last strides, which view refuses
        def forward(self, x):
            out = self.features(x)
            return self.classifier(out.reshape(out.size(0), -1))

    net = ConvNet(channel=c, num_classes=10, net_width=width, net_depth=depth,
                           net_act="relu", net_norm="instancenorm",
                           net_pooling="avgpooling", im_size=(size, size)).to(device)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).to(device)
    student = ReparamModule(net)
    student.train()
    target = start + 0.01 * torch.randn_like(start)
    criterion = torch.nn.CrossEntropyLoss()
    dsa_param = ParamDiffAug()
    num_params = start.numel()

    def step():
        student_params = [start.clone().requires_grad_(True)]
        chunks: list = []
        for _ in range(steps):  # distill/DATM.py's inner loop
            if not chunks:
                chunks = list(torch.split(torch.randperm(len(images)), batch))
            idx = chunks.pop()
            x = DiffAugment(images[idx], "color_crop_cutout_flip_scale_rotate",
                            param=dsa_param)
            out = student(x, flat_param=student_params[-1])
            ce = criterion(out, labels[idx])
            grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - syn_lr * grad)
        loss = torch.nn.functional.mse_loss(student_params[-1], target, reduction="sum")
        dist = torch.nn.functional.mse_loss(start, target, reduction="sum")
        loss = (loss / num_params) / (dist / num_params)
        for t in (images, labels, syn_lr):
            t.grad = None
        loss.backward()

    return _clock(step, args.iters, sync)


def worker_distill_ours(args, torch, device, sync) -> float:
    sys.path.insert(0, str(ROOT))
    from lightning_distill.data.augment import DSA
    from lightning_distill.functional import sample_minibatches, trajectory_matching_loss
    from lightning_distill.models import build_model, flatten_parameters

    mode, precision = args.variant.split("-")[:2]
    channels_last = "-cl" in args.variant
    c, size, *_ = SHAPES[args.shape]
    _, _, _, _, n, batch, steps = SHAPES[args.shape]
    images, labels, syn_lr, width, depth = _problem(torch, args.shape, device)
    model = build_model("ConvNet", channels=c, num_classes=10, image_size=size, width=width,
                        depth=depth).to(device)
    start = flatten_parameters(model).detach().to(device)
    target = start + 0.01 * torch.randn_like(start)
    dsa = DSA.for_dataset("cifar10" if c == 3 else "fashion_mnist")
    if channels_last:
        class _ChannelsLast:  # DSA, its output in channels_last memory format
            sample = staticmethod(dsa.sample)

            @staticmethod
            def apply(x, p):
                return dsa.apply(x, p).contiguous(memory_format=torch.channels_last)

        augment = _ChannelsLast()
    else:
        augment = dsa
    gen = torch.Generator().manual_seed(2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        batches = sample_minibatches(n, batch, steps, gen, device=device)
        for t in (images, labels, syn_lr):
            t.grad = None
        with autocast:  # training_step and manual_backward both run inside it
            loss = trajectory_matching_loss(model, start, target, images, labels, syn_lr,
                                            batches, augment, mode, generator=gen)
            loss.backward()

    return _clock(step, args.iters, sync)


def worker_expert(args, torch, device, sync) -> float:
    sys.path.insert(0, str(ROOT))
    import warnings

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_distill import ExpertTrajectoryModule
    from lightning_distill.callbacks import GSAM

    warnings.filterwarnings("ignore")
    c, size, width, depth, *_ = SHAPES[args.shape]
    nb, bs = args.iters + 2, 256
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(nb * bs, c, size, size, generator=g),
                         torch.randint(0, 10, (nb * bs,), generator=g))
    module = ExpertTrajectoryModule("ConvNet", channels=c, num_classes=10, image_size=size,
                                    model_kwargs={"width": width, "depth": depth}, lr=0.01)
    stamps: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *a):
            sync()
            stamps.append(time.perf_counter())

    trainer = pl.Trainer(accelerator=device.type, devices=1, max_epochs=1, logger=False,
                         precision="bf16-mixed" if args.variant.startswith("bf16")
                         else "32-true",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[GSAM(), Clock()])
    trainer.fit(module, DataLoader(data, batch_size=bs))
    wall = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
    return {"seconds": wall, "cpu": float("nan")}


def worker_evaluate(args, torch, device, sync) -> float:
    sys.path.insert(0, str(ROOT))
    from lightning_distill.data.augment import DSA
    from lightning_distill.functional.evaluation import EvalProtocol

    c, size, width, depth, n, *_ = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, c, size, size, generator=g), torch.randn(n, 10, generator=g)
    test_x = torch.randn(2000, c, size, size, generator=g)
    test_y = torch.randint(0, 10, (2000,), generator=g)
    protocol = EvalProtocol(epochs=20, batch_size=256,
                            precision="bf16-mixed" if args.variant.startswith("bf16")
                            else "32-true")
    dsa = DSA.for_dataset("cifar10" if c == 3 else "fashion_mnist")

    def step():
        protocol.train_runs("ConvNet", {"width": width, "depth": depth}, [0, 1], images,
                            labels, set_lr=0.01, num_classes=10, test_images=test_x,
                            test_labels=test_y, device=device, augment=dsa)

    return _clock(step, max(1, args.iters // 2), sync)


def worker(args) -> None:
    torch = _setup(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.variant.endswith("-heap"):
        sys.path.insert(0, str(ROOT))
        from lightning_distill.allocator import reuse_freed_memory

        if not reuse_freed_memory():
            raise SystemExit("-heap: this C library is not glibc")
    if args.part == "distill":
        fn = worker_distill_datm if args.variant.startswith("datm") else worker_distill_ours
    else:
        fn = worker_expert if args.part == "expert" else worker_evaluate
    out = fn(args, torch, device, sync)
    import resource

    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


# ---------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datm", help="a DATM checkout (needed for the distill part)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", nargs="+", default=["distill", "expert", "evaluate"],
                   choices=["distill", "expert", "evaluate"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="timed calls per process")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true",
                   help="also time bf16 full/recompute with channels_last activations")
    p.add_argument("--variants", nargs="+", help="only these distill variants")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if "distill" in args.parts and not args.datm and not args.variants:
        p.error("--datm DIR (a DATM checkout) is needed for the distill part")
    distill = list(args.variants or DISTILL)
    if args.channels_last:
        distill += ["full-bf16-cl-heap", "recompute-bf16-cl-heap"]
    other = list(OTHER)
    if args.device != "cpu":  # "-heap" tunes the CPU allocator: the same run on a GPU
        distill, other = ([*dict.fromkeys(v.removesuffix("-heap") for v in names)]
                          for names in (distill, other))
    jobs = [(part, shape, v) for part in args.parts for shape in args.shapes
            for v in (distill if part == "distill" else other)]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, device {args.device}, "
          f"commit {_commit()}, repeats {args.repeats}, iters {args.iters}", flush=True)
    times: dict[tuple, list[float]] = {j: [] for j in jobs}
    cpus: dict[tuple, list[float]] = {j: [] for j in jobs}
    peaks: dict[tuple, list[float]] = {j: [] for j in jobs}
    for r in range(args.repeats):
        for job in jobs:
            part, shape, variant = job
            cmd = [sys.executable, __file__, "--worker", "--part", part, "--shape", shape,
                   "--variant", variant, "--device", args.device, "--iters", str(args.iters)]
            if args.datm:
                cmd += ["--datm", args.datm]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(f"FAILED {job}:\n{res.stderr[-2000:]}", flush=True)
                times[job].append(float("nan"))
                cpus[job].append(float("nan"))
                peaks[job].append(float("nan"))
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            times[job].append(out["seconds"])
            cpus[job].append(out["cpu"])
            peaks[job].append(out["peak_mb"])
            print(f"  round {r + 1}: {part:8s} {shape:8s} {variant:18s} {out['seconds']:8.3f} s"
                  f" wall {out['cpu']:8.3f} s CPU {out['peak_mb']:7.0f} MB peak RSS",
                  flush=True)
    _table("wall", times, jobs, distill)
    if any(c == c for cs in cpus.values() for c in cs):  # the CPU time where measured
        _table("CPU (all threads)", cpus, jobs, distill)
    print("\npeak RSS of the process (MB, median): "
          + "; ".join(f"{pa} {sh} {v} {statistics.median(ps):.0f}"
                      for (pa, sh, v), ps in peaks.items()))


def _table(what: str, times: dict, jobs: list, distill: list) -> None:
    print(f"\n{what}: part  shape  variant  median s  runs  speed-up")
    for part, shape in dict.fromkeys((j[0], j[1]) for j in jobs):
        ref_name = "datm" if part == "distill" and "datm" in distill else (
            "full-fp32-heap" if part == "distill" else "fp32")
        if (part, shape, ref_name) not in times:  # on a GPU: no "-heap" variants
            ref_name = ref_name.removesuffix("-heap")
        ref = times.get((part, shape, ref_name))
        ref_med = statistics.median(ref) if ref else float("nan")
        alt = times.get((part, shape, ref_name + "-heap"))  # the reference, tuned too
        alt_med = statistics.median(alt) if alt else None
        for (pa, sh, v), ts in times.items():
            if (pa, sh) != (part, shape):
                continue
            med = statistics.median(ts)
            runs = " ".join(f"{t:.2f}" for t in ts)
            also = f"  {alt_med / med:5.2f}x vs {ref_name}-heap" if alt_med else ""
            print(f"{pa:9s} {sh:9s} {v:22s} {med:8.3f}   {runs:20s} "
                  f"{ref_med / med:5.2f}x vs {ref_name}{also}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
