"""Validation accuracy by epoch of experts, read from their TensorBoard logs, and the
choice of the experts' lr on the validation split (issue 26).

    python benchmarks/expert_curves.py outputs/fashion_mnist_r2/probe_lr0.03/logs ...
    python benchmarks/expert_curves.py --choose --output lr_probe.json DIR=LR DIR=LR ...

A DIR holds ``experts/expert_<i>/events.*`` (the experts stage's default logger). With
``--choose``, each ``DIR=LR`` is one candidate lr and the rule is: the highest mean
validation accuracy over the last 3 epochs (the end of the trajectory is what the
later matching segments see; three epochs damp the epoch-to-epoch noise of one expert).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalar_series(logdir: Path, tags: list[str]) -> dict[Path, dict[str, dict[int, float]]]:
    """``{run directory: {tag: {step: value}}}`` for every TensorBoard run under
    ``logdir`` that logged any of ``tags`` (a step logged twice, as after a resume from
    a checkpoint, keeps its last value)."""
    out: dict[Path, dict[str, dict[int, float]]] = {}
    for run in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        logged = acc.Tags().get("scalars", [])
        series = {t: {e.step: e.value for e in sorted(acc.Scalars(t), key=lambda e: e.wall_time)}
                  for t in tags if t in logged}
        if series:
            out[run] = series
    return out


def val_curve(logdir: Path, tag: str = "val/acc") -> dict[str, list[float]]:
    """``{expert run name: [val acc of epoch 1, 2, ...]}`` under ``logdir``."""
    return {run.name: [v for _, v in sorted(series[tag].items())]
            for run, series in scalar_series(logdir, [tag]).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="log directories (DIR=LR with --choose)")
    p.add_argument("--choose", action="store_true")
    p.add_argument("--last", type=int, default=3, help="epochs averaged by the rule")
    p.add_argument("--output", help="write the curves and the choice (JSON)")
    args = p.parse_args(argv)
    result: dict = {"rule": f"highest mean val/acc over the last {args.last} epochs",
                    "candidates": []}
    for item in args.dirs:
        d, _, lr = item.partition("=")
        for name, curve in val_curve(Path(d)).items():
            tail = curve[-args.last:]
            score = sum(tail) / len(tail) if tail else float("nan")
            result["candidates"].append({"dir": d, "lr": float(lr) if lr else None,
                                         "expert": name, "epochs": len(curve),
                                         "val_acc": [round(v, 5) for v in curve],
                                         "score": round(score, 5)})
            print(f"{d} {name} ({len(curve)} epochs): "
                  + " ".join(f"{100 * v:.1f}" for v in curve) + f"  | score {100 * score:.2f}")
    if args.choose:
        cands = [c for c in result["candidates"] if c["lr"] is not None]
        if not cands:
            print("no candidate with a val/acc curve", file=sys.stderr)
            return 1
        best = max(cands, key=lambda c: c["score"])
        result["chosen_lr"] = best["lr"]
        print(f"chosen lr: {best['lr']} (score {100 * best['score']:.2f})")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
