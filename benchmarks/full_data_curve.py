"""How long the full-data row must train (issue 26): networks trained on the whole
training split under the evaluation protocol (SGD momentum 0.9, wd 5e-4, the lr decayed
x0.1 at half the epochs, DSA; the ``full`` baseline of ``lightning-distill evaluate``)
for each epoch budget, tested on the validation split. The budget after which the
validation accuracy stops rising is the one to give ``evaluate --full_epochs``.

    python benchmarks/full_data_curve.py --epochs 10 20 40 --json full_curve.json

Each budget is a separate schedule (the decay moves with it), so each is its own run; a
budget already in ``--json`` with the same settings is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import EvalProtocol, summarize
from lightning_distill.io import atomic_write_json
from lightning_distill.modules.evaluate import evaluate_synthetic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", required=True)
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--model", default="ConvNet")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dm = RealDataModule(args.data, val_fraction=args.val_fraction)
    dm.setup("fit")
    train_x, train_y = dm.train_set.tensors
    val_x, val_y = dm.val_set.tensors
    full = SyntheticSet(images=train_x, labels=train_y, lr=args.lr,
                        meta={"dataset": dm.name, "input_space": dm.input_space,
                              "num_classes": dm.num_classes})
    settings = {k: getattr(args, k) for k in
                ("data", "val_fraction", "model", "width", "lr", "batch_size", "runs", "seed")}
    out = {}
    if args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            out = json.load(f)
    for epochs in args.epochs:
        done = out.get(str(epochs))
        if done and done.get("settings") == settings:
            print(f"{epochs} epochs: validation {100 * done['mean']:.2f} % (from {args.json})")
            continue
        protocol = EvalProtocol(epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                                group_size=1)
        res = evaluate_synthetic(full, val_x, val_y, models=[args.model], runs=args.runs,
                                 seed=args.seed, protocol=protocol,
                                 model_kwargs={args.model: {"width": args.width}})[args.model]
        mean, std = summarize(res["accs"])
        out[str(epochs)] = {"accs": res["accs"], "mean": mean, "std": std,
                            "settings": settings}
        print(f"{epochs} epochs: validation {100 * mean:.2f} +- {100 * std:.2f} % "
              f"({args.runs} network(s))", flush=True)
        if args.json:
            atomic_write_json(args.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
