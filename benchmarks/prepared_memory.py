"""Data larger than memory (issue 29): peak resident memory and time of an experts epoch
and of the distillation's initialisation, prepared + streamed against in memory.

On generated data in the published ``imagenet64`` layout (``train_data_batch_1..10.npz``
and ``val_data.npz``, key ``data`` uint8 [N, 3*64*64], ``labels`` 1..1000) at two sizes
(default 26,000 and 104,000 training images, 1000 classes; the 64 px test split fixed at
5,000), each measurement in a fresh process (its own peak RSS, ``ru_maxrss``):

- ``prepare``: ``lightning-distill prepare --config imagenet64/experts`` (once per size);
- ``experts``: ``lightning-distill experts --config imagenet64/experts`` with one expert,
  one epoch, ``--trainer.limit_train_batches 10`` (the issue's memory criterion: the
  peak grows by less than 150 MB from the small to the large size while the uint8 data
  grow by about 940 MB), streamed (the recipe) and, with ``--in-memory``, with
  ``data.prepared false data.hold true`` (the whole split read and held as float32);
- ``init``: ``DistillationModule.initialize`` (``--ipc``, default 1, ``--image-init``,
  default ``real``: the first ipc rows of each class's permutation, found by the class
  index; soft labels from the expert just trained) from the streamed split.

``--fashion-mnist``: the experts epoch's time on Fashion-MNIST (54,000 training images,
width-32 ConvNet-3, batch 256, ``--fm-batches`` batches), held float32 against prepared
+ streamed, interleaved over ``--repeats`` rounds (the issue's 10 % criterion).

    OMP_NUM_THREADS=2 python benchmarks/prepared_memory.py --workdir /tmp/pm --fashion-mnist
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64
CLASSES = 1000


def generate(directory: Path, n_train: int, n_test: int, seed: int = 0) -> int:
    """The npz release layout with random pixels; returns the bytes of uint8 data."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = np.array_split(np.arange(n_train), 10)
    for k, rows in enumerate(parts, 1):
        path = directory / f"train_data_batch_{k}.npz"
        if not path.exists():
            data = rng.integers(0, 256, (rows.size, 3 * SIDE * SIDE), dtype=np.uint8)
            labels = (rows % CLASSES + 1).astype(np.int64)  # every class, 1..1000
            np.savez(path, data=data, labels=labels)
    path = directory / "val_data.npz"
    if not path.exists():
        data = rng.integers(0, 256, (n_test, 3 * SIDE * SIDE), dtype=np.uint8)
        np.savez(path, data=data, labels=(np.arange(n_test) % CLASSES + 1).astype(np.int64))
    return (n_train + n_test) * 3 * SIDE * SIDE


_CHILD = r"""
import json, resource, sys, time
sys.argv = ["lightning-distill"] + json.loads(sys.argv[1])
mode = sys.argv.pop(1)
start = time.perf_counter()
if mode == "cli":
    from lightning_distill import cli
    rc = cli.main(sys.argv[1:])
    assert rc == 0, rc
elif mode == "init":
    import torch
    from lightning_distill.data.datamodule import RealDataModule
    from lightning_distill.modules.distill import DistillationModule
    store, root, ipc = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dm = RealDataModule("imagenet64", root=root, prepared=True, hold=False, val_fraction=0.02)
    dm.setup()
    module = DistillationModule(store, ipc, mode="tesla", image_init=sys.argv[4],
                                label_init="soft", learn_labels=True, max_start_epoch=1,
                                expert_epochs=1, syn_steps=2)
    t0 = time.perf_counter()
    module.initialize(dm)
    print("init_seconds", time.perf_counter() - t0, "rows_read", dm.train_set.rows_read,
          file=sys.stderr)
elif mode == "fm":
    import torch, pytorch_lightning as pl
    from lightning_distill.data.datamodule import RealDataModule
    from lightning_distill.modules.expert import ExpertTrajectoryModule
    streamed, batches, prepared_root = sys.argv[1] == "streamed", int(sys.argv[2]), sys.argv[3]
    extra = dict(prepared=True, hold=False, prepared_root=prepared_root) if streamed else {}
    dm = RealDataModule("fashion_mnist", batch_size=256, **extra)
    dm.prepare_data(); dm.setup()
    pl.seed_everything(0, verbose=False)
    model = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 32}, lr=0.01, dsa=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches,
                         limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    print("fit_seconds", time.perf_counter() - t0, file=sys.stderr)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"seconds": time.perf_counter() - start, "max_rss_mb": rss / 1024}))
"""


def child(mode: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter; its JSON line plus the timed part."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([mode, *args])],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for line in proc.stderr.splitlines():
        parts = line.split()
        if parts and parts[0] in ("init_seconds", "fit_seconds"):
            out[parts[0]] = float(parts[1])
            if "rows_read" in parts:
                out["rows_read"] = int(parts[parts.index("rows_read") + 1])
    return out


def imagenet64(workdir: Path, sizes: list[int], n_test: int, in_memory: bool, ipc: int,
               image_init: str) -> list[dict]:
    rows = []
    for n in sizes:
        data = workdir / f"imagenet64_{n}"
        t0 = time.perf_counter()
        nbytes = generate(data, n, n_test)
        print(f"[{n}] generated in {time.perf_counter() - t0:.0f} s", flush=True)
        common = ["--config", "imagenet64/experts", "--data.root", str(data)]
        row: dict = {"train_images": n, "test_images": n_test, "uint8_mb": nbytes / 1e6}
        row["prepare"] = child("cli", "prepare", *common)
        print(f"[{n}] prepare {row['prepare']}", flush=True)
        run = ["--num_experts", "1", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "10", "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false"]
        store = workdir / f"store_{n}"
        row["experts_streamed"] = child("cli", "experts", *common, *run, "--store", str(store),
                                        "--log_dir", str(workdir / f"logs_{n}"))
        print(f"[{n}] experts streamed {row['experts_streamed']}", flush=True)
        if in_memory:
            row["experts_in_memory"] = child(
                "cli", "experts", *common, *run, "--data.prepared", "false", "--data.hold",
                "true", "--store", str(workdir / f"store_mem_{n}"),
                "--log_dir", str(workdir / f"logs_mem_{n}"))
            print(f"[{n}] experts in memory {row['experts_in_memory']}", flush=True)
        row["init_streamed"] = child("init", str(store), str(data), str(ipc), image_init)
        print(f"[{n}] init {row['init_streamed']}", flush=True)
        rows.append(row)
    return rows


def fashion_mnist(workdir: Path, batches: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {"held": [], "streamed": []}
    for _ in range(repeats):
        for kind in times:
            out = child("fm", kind, str(batches), str(workdir / "prepared_fm"))
            times[kind].append(out["fit_seconds"])
            print(f"fashion_mnist {kind}: {out}", flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"batches": batches, "seconds": times, "median": med,
            "streamed_over_held": med["streamed"] / med["held"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[26_000, 104_000])
    p.add_argument("--test-images", type=int, default=5_000)
    p.add_argument("--in-memory", action="store_true", help="also the in-memory experts run")
    p.add_argument("--fashion-mnist", action="store_true")
    p.add_argument("--skip-imagenet64", action="store_true")
    p.add_argument("--ipc", type=int, default=1, help="the initialisation's images per class")
    p.add_argument("--image-init", default="real", help="the initialisation's image_init "
                   "(samples_predicted_correctly scans a class until the expert classifies "
                   "ipc of its images correctly: all of it on random pixels)")
    p.add_argument("--fm-batches", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result: dict = {"date": datetime.date.today().isoformat(), "commit": commit,
                    "threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.skip_imagenet64:
        result["imagenet64"] = rows = imagenet64(args.workdir, args.sizes, args.test_images,
                                                 args.in_memory, args.ipc, args.image_init)
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            result["growth_mb"] = {
                "uint8_data": b["uint8_mb"] - a["uint8_mb"],
                **{k: b[k]["max_rss_mb"] - a[k]["max_rss_mb"]
                   for k in ("experts_streamed", "init_streamed", "experts_in_memory")
                   if k in a and k in b}}
    if args.fashion_mnist:
        result["fashion_mnist"] = fashion_mnist(args.workdir, args.fm_batches, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
