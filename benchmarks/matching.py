"""Time and memory of one outer iteration of trajectory matching, per mode.

Compares, side by side in one run, ``trajectory_matching_loss`` in modes full, recompute
and tesla with a reference-style baseline written here the way MTT's public code does it
(one flat parameter vector, a per-step Python list of student parameter tensors, every
step kept with ``autograd.grad(create_graph=True)``, loss from ``mse_loss(reduction="sum")``
divided by the start distance). One outer iteration = unroll + ``.backward()``.

Memory:
- CUDA: peak of ``torch.cuda.max_memory_allocated`` during the iteration minus the memory
  allocated before it (reset per case).
- CPU: there is no allocator peak counter, so the script reports the peak of the bytes of
  tensors alive in autograd's saved-tensor storage, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once while any saved
  reference to it is alive; recompute's per-step theta trajectory is saved through
  ``ctx.save_for_backward`` and so is counted). That is the activation memory that grows
  with syn_steps; parameters, gradients and transient buffers are not included.

Growth per step = (mem(N_max) - mem(N_min)) / (N_max - N_min). Targets (issue 4): full no
slower than the baseline on CPU (>= 2x faster on a GPU); recompute's growth per step
<= 5% of full's, at <= 1.6x full's time.

Examples::

    python benchmarks/matching.py --device cuda                       # CIFAR-10 shapes
    OMP_NUM_THREADS=2 python benchmarks/matching.py --device cpu --batch-syn 10 \\
        --num-images 10 --syn-steps 5 10 20 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_distill.data.augment import DSA
from lightning_distill.functional import (
    classification_loss,
    sample_minibatches,
    trajectory_matching_loss,
)
from lightning_distill.models import ParamSpec, build_model, flatten_parameters

MODES = ("baseline", "full", "recompute", "tesla")


def reference_style_loss(model, start, target, images, labels, syn_lr, batches, dsa, gen):
    """MTT-style unroll: list of flat student parameter tensors, all steps kept."""
    spec = ParamSpec.of(model)
    student_params = [start.detach().clone().requires_grad_(True)]
    for idx in batches:
        x = images[idx]
        y = labels[idx]
        if dsa is not None:
            x = dsa(x, gen)
        out = functional_call(model, spec.unflatten(student_params[-1]), (x,))
        ce = classification_loss(out, y)
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start.numel()
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    return param_loss / param_dist


class SavedTensorMeter:
    """Peak bytes of live autograd saved tensors (each storage counted once)."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def hooks(self):
        meter = self

        class Holder:
            __slots__ = ("t", "key")

            def __init__(self, t: torch.Tensor) -> None:
                self.t = t
                st = t.untyped_storage()
                self.key = st.data_ptr()
                entry = meter.live.get(self.key)
                if entry is None:
                    meter.live[self.key] = [1, st.nbytes()]
                    meter.current += st.nbytes()
                    meter.peak = max(meter.peak, meter.current)
                else:
                    entry[0] += 1

            def __del__(self) -> None:
                meter._release(self.key)

        return torch.autograd.graph.saved_tensors_hooks(Holder, lambda h: h.t)


def make_problem(args, steps: int, device, dtype):
    torch.manual_seed(0)
    model = build_model(
        "ConvNet",
        channels=args.channels,
        num_classes=args.num_classes,
        image_size=args.image_size,
        width=args.width,
        depth=args.depth,
    ).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    start = flatten_parameters(model).detach().clone()
    target = start + 0.01 * torch.randn(start.shape, generator=g).to(device, dtype)
    n, s = args.num_images, args.image_size
    images = torch.randn(n, args.channels, s, s, generator=g).to(device, dtype)
    images.requires_grad_(True)
    if args.soft_labels:
        labels = torch.randn(n, args.num_classes, generator=g).to(device, dtype)
        labels.requires_grad_(True)
    else:
        labels = (torch.arange(n) % args.num_classes).to(device)
    syn_lr = torch.tensor(0.01, device=device, dtype=dtype, requires_grad=True)
    # CPU index tensors, as DistillationModule passes them (checked on the CPU, moved in
    # one copy); the baseline gets them already on the device (untimed), an advantage
    cpu_batches = sample_minibatches(n, args.batch_syn, steps, torch.Generator().manual_seed(2))
    dev_batches = [b.to(device) for b in cpu_batches]
    return model, start, target, images, labels, syn_lr, (cpu_batches, dev_batches)


def one_iteration(mode, problem, dsa, meter):
    model, start, target, images, labels, syn_lr, (cpu_batches, dev_batches) = problem
    gen = torch.Generator().manual_seed(3)
    with meter.hooks() if meter is not None else contextlib.nullcontext():
        if mode == "baseline":
            loss = reference_style_loss(
                model, start, target, images, labels, syn_lr, dev_batches, dsa, gen
            )
        else:
            loss = trajectory_matching_loss(
                model, start, target, images, labels, syn_lr, cpu_batches, dsa, mode,
                generator=gen,
            )
        loss.backward()
    return loss.detach()


def measure(mode, problem, dsa, device):
    """One timed outer iteration: (seconds, memory bytes, gradients of images/labels/syn_lr).

    Memory: on CUDA the allocator's peak above what was allocated before (previous
    gradients freed first); on the CPU the peak of live autograd saved tensors (the hooks
    cost Python time, so they are off on CUDA, where the allocator measures).
    """
    cuda = device.type == "cuda"
    for t in problem[3:6]:
        t.grad = None
    gc.collect()
    meter = None if cuda else SavedTensorMeter()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    one_iteration(mode, problem, dsa, meter)
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) - base if cuda else meter.peak
    grads = tuple(t.grad.detach().clone() if t.grad is not None else None for t in problem[3:6])
    return dt, mem, grads


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--num-images", type=int, default=100, help="synthetic set size (ipc * K)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--soft-labels", action="store_true", help="learnable logits (DATM)")
    p.add_argument("--no-dsa", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no-tf32", action="store_true",
                   help="full-precision float32 convolutions on CUDA (PyTorch's default "
                   "lets cuDNN use TF32, which shows in the gradient-difference column)")
    args = p.parse_args(argv)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    dsa = None if args.no_dsa else DSA()
    cuda = device.type == "cuda"
    dev_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(
        f"# matching benchmark {datetime.date.today()} torch {torch.__version__} on "
        f"{device.type} ({dev_name}), threads {torch.get_num_threads()}, {args.dtype}"
        + (f", cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmul "
           f"TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}" if cuda else "")
    )
    print(
        f"# ConvNet-{args.depth} width {args.width}, {args.channels}x{args.image_size}x"
        f"{args.image_size}, {args.num_classes} classes, {args.num_images} images, batch_syn "
        f"{args.batch_syn}, DSA {'off' if args.no_dsa else 'on'}, "
        f"{'soft' if args.soft_labels else 'hard'} labels, {args.repeats} interleaved "
        f"repeats (+{args.warmup} warm-up), ratios from the min"
    )
    mem_label = "peak mem MiB" if cuda else "peak saved MiB"
    results: dict[tuple[str, int], tuple[float, float]] = {}
    print()
    print(
        f"| syn_steps | mode | s / iter (min) | s / iter (median) | time / {args.modes[0]}'s | "
        f"{mem_label} | grad rel. diff vs {args.modes[0]} |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for steps in args.syn_steps:
        problem = make_problem(args, steps, device, dtype)
        times = {m: [] for m in args.modes}
        mems = {m: 0 for m in args.modes}
        grads = {}
        for m in args.modes:
            for _ in range(args.warmup):
                measure(m, problem, dsa, device)
        for rep in range(args.repeats):  # interleaved, rotating order: fair under load
            k = rep % len(args.modes)
            for m in args.modes[k:] + args.modes[:k]:
                dt, mem, grads[m] = measure(m, problem, dsa, device)
                times[m].append(dt)
                mems[m] = max(mems[m], mem)
        ref = args.modes[0]
        for m in args.modes:
            t = min(times[m])
            results[(m, steps)] = (t, mems[m])
            diff = max(
                rel_diff(a, b) for a, b in zip(grads[m], grads[ref], strict=True) if a is not None
            )
            print(
                f"| {steps} | {m} | {t:.3f} | {statistics.median(times[m]):.3f} | "
                f"{t / min(times[ref]):.2f} | {mems[m] / 2**20:.1f} | {diff:.1e} |",
                flush=True,
            )
        del problem, grads
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    lo, hi = min(args.syn_steps), max(args.syn_steps)
    if hi > lo:
        print()
        print("| mode | mem growth MiB / step | growth / full's | time / full's (per syn_steps) |")
        print("|---|---:|---:|---|")
        growth = {
            m: (results[(m, hi)][1] - results[(m, lo)][1]) / (hi - lo) / 2**20 for m in args.modes
        }
        for m in args.modes:
            rel = (
                growth[m] / growth["full"] if "full" in growth and growth["full"] else float("nan")
            )
            tr = (
                ", ".join(
                    f"{results[(m, s)][0] / results[('full', s)][0]:.2f}" for s in args.syn_steps
                )
                if "full" in args.modes
                else "-"
            )
            print(f"| {m} | {growth[m]:.2f} | {rel:.3f} | {tr} |")


if __name__ == "__main__":
    main()
