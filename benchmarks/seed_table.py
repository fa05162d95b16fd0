"""The Fashion-MNIST table over distillation seeds (issue 26): every row of a
results.json written by ``lightning-distill evaluate`` whose set lies at ``.../<run>_s<seed>/``
(``best.pt`` or ``synthetic.pt``) is grouped by ``<run>``; a group's line gives the mean
over its seeds of each seed's test mean, the std across those seed means, and the mean of
the evaluation std within a seed (5 networks each), then every seed's own mean. The
baseline rows (random real, full data) pass through; with ``--validation`` (val_select.py's
JSON) each group's validation mean over seeds is added.

    python benchmarks/seed_table.py results.json [--validation validation.json] [--json out]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

SEED_DIR = re.compile(r"(?P<run>[^/]+)_s(?P<seed>\d+)/(best|synthetic)\.pt\)?$")


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def group_rows(rows: list[dict], model: str, validation: dict | None = None) -> list[dict]:
    """The table's lines: baselines as they are, distilled rows grouped by run name."""
    groups: dict[str, dict] = {}
    lines: list[dict] = []
    for row in rows:
        res = row["results"][model]
        if row["kind"] != "distilled":
            lines.append({"label": row["label"], "ipc": row.get("ipc"), "seeds": None,
                          "mean": res["mean"], "std_seeds": None, "std_within": res["std"]})
            continue
        path = row["label"].split("(", 1)[-1].rstrip(")")
        m = SEED_DIR.search(path)
        run = m["run"] if m else path
        g = groups.get(run)
        if g is None:
            g = groups[run] = {"label": run, "ipc": row["ipc"], "per_seed": {}, "val": {}}
            lines.append(g)
        seed = int(m["seed"]) if m else 0
        g["per_seed"][seed] = res
        if validation and path in validation:
            g["val"][seed] = validation[path]["mean"]
    for g in groups.values():
        means = [r["mean"] for _, r in sorted(g["per_seed"].items())]
        g.update(seeds=sorted(g["per_seed"]), mean=statistics.fmean(means),
                 std_seeds=_spread(means),
                 std_within=statistics.fmean(r["std"] for r in g["per_seed"].values()),
                 seed_means=means)
        g["val_mean"] = statistics.fmean(g["val"].values()) if g["val"] else None
        del g["per_seed"]
    return lines


def markdown(lines: list[dict]) -> str:
    out = ["| training set | seeds | test acc. % (mean over seeds +- std across seeds) "
           "| std within a seed | per seed | validation % |",
           "|---|---:|---:|---:|---|---:|"]
    for ln in lines:
        if ln["seeds"] is None:
            out.append(f"| {ln['label']} | | {100 * ln['mean']:.1f} | "
                       f"{100 * ln['std_within']:.1f} | | |")
            continue
        per = " / ".join(f"{100 * v:.1f}" for v in ln["seed_means"])
        val = "" if ln["val_mean"] is None else f"{100 * ln['val_mean']:.1f}"
        out.append(f"| {ln['label']} (ipc {ln['ipc']}) | {len(ln['seeds'])} | "
                   f"{100 * ln['mean']:.1f} +- {100 * ln['std_seeds']:.1f} | "
                   f"{100 * ln['std_within']:.1f} | {per} | {val} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--validation", default=None)
    ap.add_argument("--model", default="ConvNet")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["rows"]
    val = json.loads(Path(args.validation).read_text()) if args.validation else None
    lines = group_rows(rows, args.model, val)
    print(markdown(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(lines, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
