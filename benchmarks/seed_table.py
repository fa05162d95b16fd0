"""A results.json (``lightning-distill evaluate``) as RESULTS.md's table over distillation
seeds (issue 26): the baseline rows and sets of one seed as they are, then every
configuration distilled from several seeds (sets in ``<name>_s<seed>/`` directories) as
one line: the mean over its seeds of each seed's test mean, the std across those means,
the mean evaluation std within a seed, and each seed's mean (the grouping of
:func:`lightning_distill.stages.evaluate.seed_groups`). With ``--validation``
(val_select.py's JSON) each line gets its validation mean over the same sets. Rows from
files written before rows carried their ``path`` take it from their label.

When the rows carry DD-Ranking's scores (the evaluate stage's default), a second table
says what the labels give ("Hard Truths about Soft Labels", CVPR 2026): per seed group,
the sets as distilled, the same images with hard labels, random real subsets with the
sets' kind of labels (for soft-label sets: DATM's soft labels from the experts they were
distilled from) and with hard labels (the random baseline), each a mean over the seeds.

    python benchmarks/seed_table.py results.json [--validation validation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lightning_distill.stages.evaluate import seed_groups


def markdown(rows: list[dict], groups: list[dict], model: str,
             validation: dict | None = None) -> str:
    out = ["| training set | seeds | test acc. % (mean over seeds +- std across seeds) "
           "| evaluation std within a seed | per seed | validation % |",
           "|---|---:|---:|---:|---|---:|"]
    grouped = {p for g in groups for p in g["paths"]}
    for row in rows:  # baselines, and sets of one seed
        if row.get("path") not in grouped:
            r = row["results"][model]
            out.append(f"| {row['label']} | | {100 * r['mean']:.1f} | {100 * r['std']:.1f} | | |")
    for g in groups:
        r = g["results"][model]
        per = " / ".join(f"{100 * v:.1f}" for v in r["seed_means"])
        vals = [validation[p]["mean"] for p in g["paths"] if validation and p in validation]
        val = f"{100 * statistics.fmean(vals):.1f}" if vals else ""
        out.append(f"| {g['label']} | {len(g['seeds'])} | {100 * r['mean']:.1f} +- "
                   f"{100 * r['std']:.1f} | {100 * r['std_within']:.1f} | {per} | {val} |")
    return "\n".join(out)


def _seed_mean(runs: list[list[float]]) -> str:
    """The mean over the seeds of each seed's mean over its runs, in percent."""
    return f"{100 * statistics.fmean(statistics.fmean(r) for r in runs):.1f}"


def labels_markdown(rows: list[dict], groups: list[dict], model: str) -> str:
    """The labels table of the module docstring ('' when no group has scores). A set is
    soft when its hard-label run differs from its own (``add_scores`` gives a hard-label
    set its own accuracies as ``syn_hard`` and the random baseline's as ``random``)."""
    by_path = {r.get("path"): r for r in rows if r["kind"] == "distilled"}
    random_rows = {r["ipc"]: r for r in rows if r["kind"] == "random"}
    out = ["| configuration | labels | the sets | their images, hard labels | random real, "
           "the sets' labels | random real, hard labels | IOR (points) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for g in groups:
        members = [by_path[p] for p in g["paths"]]
        scored = [r["scores"][model] for r in members
                  if (r.get("scores") or {}).get(model, {}).get("accs", {}).get("random")]
        if len(scored) != len(members):
            continue
        soft = any(s["accs"]["syn_hard"] != r["results"][model]["accs"]
                   for s, r in zip(scored, members, strict=True))
        base = random_rows.get(g["ipc"])
        hard_random = f"{100 * base['results'][model]['mean']:.1f}" if base else ""
        ior = statistics.fmean(s["ior"]["mean"] for s in scored) if all(
            s.get("ior") for s in scored) else None
        out.append(f"| {g['label']} | {'soft' if soft else 'hard'} | "
                   f"{_seed_mean([r['results'][model]['accs'] for r in members])} | "
                   f"{_seed_mean([s['accs']['syn_hard'] for s in scored])} | "
                   f"{_seed_mean([s['accs']['random'] for s in scored])} | {hard_random} | "
                   f"{'' if ior is None else f'{100 * ior:.1f}'} |")
    return "\n".join(out) if len(out) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--validation", default=None)
    ap.add_argument("--model", default="ConvNet")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["rows"]
    for row in rows:
        if row["kind"] == "distilled" and "path" not in row:
            row["path"] = row["label"].rsplit("(", 1)[-1].rstrip(")")
    val = json.loads(Path(args.validation).read_text()) if args.validation else None
    groups = seed_groups(rows, [args.model])
    print(markdown(rows, groups, args.model, val))
    labels = labels_markdown(rows, groups, args.model)
    if labels:
        print("\n" + labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
