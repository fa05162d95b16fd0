"""Where one distillation iteration's time goes (issue 12, item 3): the digits ipc 10
quickstart setting, profiled.

Three measurements, all of the same iterations (same seed, same store):

1. ``trainer`` against ``bare``, interleaved over ``--repeats``: seconds per outer
   iteration through ``pl.Trainer.fit`` (DistillationModule.training_step: the logging,
   the NaN guards, the DDP vote, the syn_lr clamp) against a bare loop that does only
   the method's work (``matching_loss``, the threshold rule, ``backward``, the
   optimizer steps). Both paths must give the same losses, which the script checks.
   Their ratio is the per-iteration cost of the training loop around the method.
2. ``torch.profiler``: the share of the wall time spent inside ATen operators and the
   operators that take it (self time).
3. ``cProfile``: the share spent in Python frames outside the operators (the unroll's
   bookkeeping, DSA sampling, ``functional_call``'s parameter swapping).

    python benchmarks/distill_iteration.py --store outputs/digits/experts
    # the store: `lightning-distill experts --config recipes/digits/experts.yaml`
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.modules.distill import DistillationModule

ROOT = Path(__file__).resolve().parents[1]


class _Clock(pl.Callback):
    """Wall time at the end of every outer iteration."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))  # manual optimisation: {"loss": ...}


def _module(settings: dict, store: str, iterations: int, dm: RealDataModule):
    m = DistillationModule(**{**settings, "store": store, "iterations": iterations})
    m.initialize(dm)
    return m


def _per_iteration(stamps: list[float]) -> float:
    """Median seconds between consecutive iteration ends (the first one, which pays the
    warm-up, is not timed)."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def run_trainer(settings, store, iterations, dm) -> tuple[float, list[float]]:
    m = _module(settings, store, iterations, dm)
    clock = _Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(m)
    return _per_iteration(clock.stamps), clock.losses


def run_bare(settings, store, iterations, dm) -> tuple[float, list[float]]:
    step = _stepper(settings, store, iterations, dm, warm_up=False)
    stamps, losses = [], []
    for it in range(iterations):
        losses.append(step(it))
        stamps.append(time.perf_counter())
    return _per_iteration(stamps), losses


def _stepper(settings, store, iterations, dm, *, warm_up: bool = True):
    """A fresh module's ``step(it) -> loss``: the method's work of one outer iteration
    (the loss, the threshold rule, backward, the optimizer steps); warmed up by one
    iteration unless ``warm_up`` is False."""
    m = _module(settings, store, iterations + int(warm_up), dm)
    opts = m.configure_optimizers()
    if not isinstance(opts, (list, tuple)):  # one optimizer (no learned labels)
        opts = [opts]
    threshold = m.hparams.threshold

    def step(it: int) -> float:
        for opt in opts:
            opt.zero_grad(set_to_none=False)
        loss, _ = m.matching_loss(it)
        value = float(loss.detach())
        if threshold is None or value <= threshold:
            loss.backward()
            for opt in opts:
                opt.step()
        return value

    if warm_up:
        step(0)
    return step


def profile_ops(settings, store, iterations, dm, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = _stepper(settings, store, iterations, dm)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for it in range(1, iterations + 1):
            step(it)
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\ntorch.profiler, {iterations} iterations: {wall / iterations:.3f} s / iteration "
          f"(profiled); ATen operators' self time {total / iterations:.3f} s / iteration = "
          f"{100 * total / wall:.0f} % of the wall time")
    print("\n| operator | share of the wall time | calls / iteration |\n|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| `{e.key}` | {100 * e.self_cpu_time_total / 1e6 / wall:.1f} % | "
              f"{e.count // iterations} |")

    step = _stepper(settings, store, iterations, dm)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for it in range(1, iterations + 1):
        step(it)
    pr.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(pr).stats  # type: ignore[attr-defined]
    python = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.items() if file != "~")
    print(f"\ncProfile, {iterations} iterations: Python frames' own time "
          f"{python / iterations:.3f} s / iteration = {100 * python / wall:.0f} % of the "
          "(profiled) wall time; the rest is in C++ (operators and the autograd engine)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="the digits experts (8 x 30 epochs)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/digits/ipc10.yaml"),
                    help="a distill recipe; its `model:` section is the setting")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-iterations", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    settings = {k: v for k, v in recipe["model"].items() if k not in ("store", "iterations")}
    data = recipe.get("data", {})
    dm = RealDataModule(data.get("name", "digits"), val_fraction=data.get("val_fraction", 0.1),
                        batch_size=data.get("batch_size", 256))
    dm.setup("fit")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"setting: {args.recipe}, model section")
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    losses = {}
    for r in range(args.repeats):
        for name, fn in (("trainer", run_trainer), ("bare", run_bare)):
            t, ls = fn(settings, args.store, args.iterations, dm)
            times[name].append(t)
            losses[name] = ls
            print(f"repeat {r}: {name} {t:.3f} s / iteration", flush=True)
    if losses["trainer"] != losses["bare"]:
        raise SystemExit(f"the two paths did different work: losses {losses['trainer'][:3]} "
                         f"against {losses['bare'][:3]}")
    tr, ba = statistics.median(times["trainer"]), statistics.median(times["bare"])
    ratios = [t / b for t, b in zip(times["trainer"], times["bare"], strict=True)]
    print(f"\nthe same {args.iterations} losses on both paths; median s / iteration: trainer "
          f"{tr:.3f}, bare {ba:.3f}; trainer / bare per repeat: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}")
    profile_ops(settings, args.store, args.profile_iterations, dm, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
