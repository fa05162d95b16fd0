"""Forward + backward of K networks: one network alone against the ways of running K
as one model (issue 12; benchmarks/HISTORY.md, 'Fashion-MNIST scale (28x28, ...)').

Times one forward + backward pass of the ConvNet on random data, with no optimizer,
data loader or DSA, so what remains is the arithmetic of each way of running K members:
`grouped` (StackedNetworks' grouped convolutions), `vmap` (torch.func over the stacked
parameters), `loop` (a Python loop over the members of the stacked parameters, through
`functional_call`). The ratio is K x one network's time / the group's time (above 1:
the group is faster per member). Interleaved repeats, the best of each.

    OMP_NUM_THREADS=2 python benchmarks/group_forward.py [--threads 2] [--k 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call

from lightning_distill.functional.batched import StackedNetworks
from lightning_distill.models import build_model

#: name -> (channels, image size, width, depth, batch)
CASES = {
    "digits ipc 10": (1, 8, 32, 2, 100),
    "fmnist32 batch 256": (1, 28, 32, 3, 256),
    "fmnist32 ipc 10": (1, 28, 32, 3, 100),
}


def _time(f, n: int) -> float:
    for _ in range(2):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


def ways_of_running(nets: list[torch.nn.Module], x: torch.Tensor) -> dict:
    """One pass of each way: ``one`` (the first network alone on ``x``) and the K
    members together (each on its own copy of ``x``)."""
    k = len(nets)
    xs = x.unsqueeze(0).expand(k, *x.shape).contiguous()
    one = nets[0]
    grouped = StackedNetworks(nets, backend="grouped")
    vmapped = StackedNetworks(nets, backend="vmap")

    def alone():
        one.zero_grad()
        one(x).sum().backward()

    def loop():
        p, b = vmapped.params_dict(), vmapped.buffers_dict()
        outs = [functional_call(vmapped._template, ({m: v[i] for m, v in p.items()},
                                                    {m: v[i] for m, v in b.items()}), (xs[i],))
                for i in range(k)]
        torch.stack(outs).sum().backward()

    return {"one": alone, "grouped": lambda: grouped(xs).sum().backward(),
            "vmap": lambda: vmapped(xs).sum().backward(), "loop": loop}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.k
    print(f"threads {torch.get_num_threads()}, K = {k}, torch {torch.__version__}")
    for name, (c, s, width, depth, n) in CASES.items():
        nets = [build_model("ConvNet", c, 10, s, width=width, depth=depth) for _ in range(k)]
        ways = ways_of_running(nets, torch.randn(n, c, s, s))
        steps = 2 if n >= 256 else 6
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.repeats):
            for w, f in ways.items():
                times[w].append(_time(f, steps))
        t1 = min(times["one"])
        cells = [f"{w} {min(v):.1f} ms (x{k * t1 / min(v):.2f})"
                 for w, v in times.items() if w != "one"]
        print(f"{name} (batch {n}): one {t1:.2f} ms; " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
