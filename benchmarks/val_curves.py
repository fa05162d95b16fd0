"""The periodic validation curves of distillations, read from their TensorBoard logs:
one markdown table, a row per logged iteration and a column per run and tag (issue 26:
each distillation runs until its validation curve stops rising, with the curve in
RESULTS.md).

    python benchmarks/val_curves.py outputs/fashion_mnist_r2/ipc10_s0 outputs/.../ipc10_s1

A run directory holds ``logs/**/events.out.tfevents.*`` (the distill stage's default
logger); ``PeriodicEvaluation`` logs ``val/acc_mean`` and, beside ``SyntheticEMA``,
``val_ema/acc_mean`` at TensorBoard step ``n - 1`` for the set after ``n`` iterations
(the table shows ``n``, as the run's log does). Several event files of one run (a
resumed run writes a new version) are merged by iteration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from expert_curves import scalar_series

TAGS = {"val/acc_mean": "", "val_ema/acc_mean": " EMA"}


def run_curves(run_dir: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """``{tag: {iteration: accuracy}}`` of one distillation, over all its event files."""
    merged: dict[str, dict[int, float]] = {}
    for _, series in sorted(scalar_series(run_dir, tags).items(), key=lambda kv: str(kv[0])):
        for tag, points in series.items():
            merged.setdefault(tag, {}).update(points)
    return merged


def table(curves: dict[str, dict[str, dict[int, float]]]) -> str:
    """Markdown: the iterations as rows, ``<run>`` / ``<run> EMA`` as columns (%)."""
    cols = [(name, tag) for name, c in curves.items() for tag in TAGS if tag in c]
    steps = sorted({s for c in curves.values() for pts in c.values() for s in pts})
    lines = ["| iteration | " + " | ".join(n + TAGS[t] for n, t in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for s in steps:
        cells = [curves[n][t].get(s) for n, t in cols]
        lines.append(f"| {s + 1} | " + " | ".join("" if v is None else f"{100 * v:.1f}"
                                               for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="distillation output directories")
    p.add_argument("--json", help="also write {run: {tag: {iteration: accuracy}}} here")
    args = p.parse_args(argv)
    curves = {Path(r).name: run_curves(Path(r), list(TAGS)) for r in args.runs}
    print(table(curves))
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
