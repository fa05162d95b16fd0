"""Validation accuracy of synthetic sets under the evaluation protocol, to choose among
them without the test set (issue 13: the choice between configurations of one ipc).

Each set trains ``--runs`` fresh networks (run r seeded with ``seed + r``, the protocol
of ``lightning-distill evaluate``: 1000 epochs, SGD momentum 0.9, lr = the set's syn_lr,
DSA) and is tested on the data module's validation split (held out of the experts, the
initialisation and the distillation), in the set's own input space: mean/std, or the ZCA
whitening its experts were trained in (refitted on the same training part and checked
against the set's fingerprint).

    python benchmarks/val_select.py --data fashion_mnist --width 32 a/best.pt b/best.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from lightning_distill.data.augment import protocol_dsa
from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.data.input_space import InputSpace
from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.functional.evaluation import EvalProtocol, summarize
from lightning_distill.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--model", default="ConvNet")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None,
                    help="write the numbers here; a set already there with the same SHA-256 "
                         "and settings is not trained again")
    args = ap.parse_args(argv)
    modules: dict[tuple, RealDataModule] = {}

    def validation_split(syn: SyntheticSet, path: str) -> tuple:
        """The validation images in the set's own input space (mean/std or the ZCA its
        experts were trained in, refitted on the same training part)."""
        space = InputSpace.from_dict(syn.meta.get("input_space") or {})
        key = (space.normalization == "zca", space.zca_regularization)
        if key not in modules:
            reg = {} if key[1] is None else {"zca_regularization": key[1]}
            modules[key] = RealDataModule(args.data, val_fraction=args.val_fraction,
                                          zca=key[0], **reg)
            modules[key].setup("fit")
        dm = modules[key]
        if not space.matches(dm.input_space):
            raise SystemExit(f"{path}: its input space {dict(space)} is not the one "
                             f"{args.data} gives ({dict(dm.input_space)})")
        return dm.val_set.tensors
    # group_size null: chosen by device and step size (groups of 8 only for small steps
    # on a CPU; the ipc 1 numbers of RESULTS.md were measured with the 5 runs as one group)
    protocol = EvalProtocol(epochs=args.epochs)
    settings = {k: getattr(args, k) for k in
                ("data", "val_fraction", "model", "width", "runs", "epochs", "seed")}
    out = {}
    if args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            out = json.load(f)
    for path in args.sets:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        done = out.get(path, {})
        if done.get("sha256") == digest and done.get("settings") == settings:
            print(f"{path}: validation accuracy {100 * done['mean']:.1f} +- "
                  f"{100 * done['std']:.1f} % (from {args.json})", flush=True)
            continue
        syn = SyntheticSet.load(path)
        vx, vy = validation_split(syn, path)
        accs = protocol.train_runs(
            args.model, {"width": args.width}, [args.seed + r for r in range(args.runs)],
            syn.images, syn.labels, set_lr=syn.lr, num_classes=syn.num_classes,
            test_images=vx, test_labels=vy, augment=protocol_dsa(protocol, args.data))
        mean, std = summarize(accs)
        out[path] = {"accs": accs, "mean": mean, "std": std, "sha256": digest,
                     "settings": settings}
        print(f"{path}: validation accuracy {100 * mean:.1f} +- {100 * std:.1f} % "
              f"({args.runs} networks x {args.epochs} epochs)", flush=True)
        if args.json:  # after every set, atomically: an interrupted run keeps what it did
            atomic_write_json(args.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
