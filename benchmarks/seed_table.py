"""A results.json (``lightning-distill evaluate``) as RESULTS.md's table over distillation
seeds (issue 26): the baseline rows and sets of one seed as they are, then every
configuration distilled from several seeds (sets in ``<name>_s<seed>/`` directories) as
one line: the mean over its seeds of each seed's test mean, the std across those means,
the mean evaluation std within a seed, and each seed's mean (the grouping of
:func:`lightning_distill.stages.evaluate.seed_groups`). With ``--validation``
(val_select.py's JSON) each line gets its validation mean over the same sets. Rows from
files written before rows carried their ``path`` take it from their label.

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
    print(markdown(rows, seed_groups(rows, [args.model]), args.model, val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
