"""Test accuracy of the experts of one or more trajectory stores, side by side.

Each expert's snapshot at the given epochs (default: the last) is loaded into the
store's architecture and tested on the real test split of the store's data set, in the
store's input space (RealDataModule with the store's data settings). Used for issue 13's
question of what the validation split costs: the experts of a store trained with
``data.val_fraction 0.1`` (90 % of the training set, the library's default) against one
trained with ``data.val_fraction 0`` (all of it, as the reference implementations).

    python benchmarks/store_accuracy.py outputs/fashion_mnist_cpu/experts \
        outputs/fashion_mnist_split/experts [--epochs 2 4 12] [--zca]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.func import functional_call

from lightning_distill.data.datamodule import RealDataModule
from lightning_distill.functional.evaluation import summarize
from lightning_distill.models import build_model
from lightning_distill.trajectories import TrajectoryStore


@torch.no_grad()
def accuracy(net: torch.nn.Module, flat: torch.Tensor, store: TrajectoryStore,
             x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    params = store.spec.unflatten(flat.to(x.dtype))
    net.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits = functional_call(net, params, (x[i:i + batch],))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / x.shape[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="trajectory store directories")
    ap.add_argument("--epochs", type=int, nargs="*", default=None,
                    help="snapshot epochs to test (default: the last)")
    ap.add_argument("--zca", action="store_true", help="the stores' data were ZCA-whitened")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    out = {}
    test = {}
    for path in args.stores:
        store = TrajectoryStore.open(path)
        if store.dataset not in test:
            dm = RealDataModule(store.dataset, zca=args.zca)
            dm.setup("test")
            test[store.dataset] = dm.test_set.tensors, dm.input_space
        (x, y), space = test[store.dataset]
        diff = store.input_space.mismatch(space)
        if diff is not None:  # a ZCA fitted on another split, say
            raise SystemExit(f"{path}: the test images are not in the store's input space "
                             f"({diff})")
        net = build_model(**store.model)
        epochs = args.epochs or [store.num_snapshots - 1]
        rows = {}
        for e in epochs:
            accs = [accuracy(net, store.snapshot(i, e), store, x, y)
                    for i in store.expert_indices()]
            mean, std = summarize(accs)
            rows[e] = {"accs": accs, "mean": mean, "std": std}
            print(f"{path}: epoch {e}: test accuracy {100 * mean:.2f} +- {100 * std:.2f} % "
                  f"over {len(accs)} experts ({', '.join(f'{100 * a:.2f}' for a in accs)})")
        out[str(path)] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
