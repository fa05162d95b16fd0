"""Storage for data sets larger than memory (issue 29): our prepared memory map against LitData.

On generated data (uint8 images 3x64x64, 1000 classes, fixed numpy seed) of each size in
``--sizes`` it measures, every reading in its own subprocess:

- preparation, once: wall seconds and bytes on disk of
  - ``memmap``: :func:`lightning_distill.data.prepared.prepare` of a ``DatasetSource``
    over the generated arrays (uint8 ``[N, C, H, W]`` + labels + class index + header,
    with the files' SHA-256);
  - ``litdata``: ``litdata.optimize(fn, inputs=range(N), chunk_bytes="64MB",
    num_workers=1)``, one ``(image uint8 [C, H, W], label, row)`` per sample, no
    compression (its default). ``row`` (8 bytes) is stored only to check orders here;
- one shuffled epoch, batch ``--batch-size``: images/s and memory of the reading process
  (growth of ``ru_maxrss`` over the epoch, and the peaks of ``RssAnon`` / ``RssFile``
  from ``/proc/self/status`` sampled after every batch: a memory map's pages are
  file-backed, reclaimable page cache, counted in RSS all the same):
  - ``memmap``: the library's streamed path, a ``SplitBatchLoader`` of a
    ``StreamedSplit`` over :func:`~lightning_distill.data.prepared.open_prepared`'s map
    (the exact order of ``TensorBatchLoader`` / ``DataLoader(shuffle=True)``);
  - ``litdata w0`` / ``litdata w1``: ``StreamingDataset(shuffle=True)`` +
    ``StreamingDataLoader(batch_size, num_workers=0 / 1)`` (its own order; for ``w1`` the
    worker's peak RSS is ``RUSAGE_CHILDREN``'s);
  - ``litdata idx``: the library's exact order read through ``StreamingDataset[i]``, one
    call per row, stacked per batch (how LitData would have to serve that order);
- random access: median time over ``--random-repeats`` draws of fetching
  ``--random-rows`` random rows (the distillation's initialisation, the class-indexed
  draws): memmap ``index_select`` against ``StreamingDataset[i]`` per row;
- orders (on the smallest size): whether LitData's shuffled epoch equals the library's
  ``randperm`` order for the same seed, how local its shuffle is (distinct chunks per
  batch), whether the ``[i]`` route gives the library's batches bit for bit, and what
  2-rank sharding LitData gives (``drop_last`` forced under a world size > 1) against
  the library's ``DistributedSampler`` sharding.

Every batch read (both readers) is checked against the generated rows on a sample of
batches. ``--cold`` first drops this benchmark's own files from the page cache
(``fsync`` + ``posix_fadvise(DONTNEED)`` per file; no system-wide cache drop), so the
reads come from disk; the default reads whatever the page cache holds after preparing.

Command (the run of benchmarks/RESULTS.md, section 10)::

    nice -n 5 .venv/bin/python benchmarks/storage_readers.py \\
        --output benchmarks/artifacts/storage_readers/storage_readers.json

Smaller, faster: ``--sizes 2000 8000``. ``--workdir DIR`` keeps the generated and
prepared files (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request on import

SHAPE = (3, 64, 64)
NUM_CLASSES = 1000
TEST_ROWS = 256  # the prepared format writes a test split too: a small one


# ------------------------------------------------------------------ helpers
def _mem_mb() -> dict[str, float]:
    """RssAnon / RssFile of this process in MB (Linux), {} elsewhere."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def _maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KB on Linux


class _MemTrack:
    """Peak RssAnon / RssFile growth, sampled by :meth:`sample`, and ru_maxrss growth."""

    def __init__(self) -> None:
        self.base = _mem_mb()
        self.base_maxrss = _maxrss_mb()
        self.peak = dict(self.base)

    def sample(self) -> None:
        for k, v in _mem_mb().items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)

    def result(self) -> dict[str, float]:
        self.sample()

        def growth(key: str) -> float:
            return round(self.peak.get(key, 0.0) - self.base.get(key, 0.0), 1)

        return {"maxrss_growth_mb": round(_maxrss_mb() - self.base_maxrss, 1),
                "anon_peak_growth_mb": growth("RssAnon"),
                "file_peak_growth_mb": growth("RssFile")}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _drop_from_page_cache(path: Path) -> None:
    """Write back and drop this directory's files from the page cache (ours only)."""
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _generated(workdir: Path, n: int) -> tuple[Any, Any, Any, Any]:
    """The generated arrays of size ``n`` (memory-mapped .npy files)."""
    import numpy as np

    d = workdir / f"gen-{n}"
    return tuple(np.load(d / f"{name}.npy", mmap_mode="r")
                 for name in ("train_x", "train_y", "test_x", "test_y"))  # type: ignore[return-value]


def generate(workdir: Path, n: int, seed: int) -> None:
    """uint8 images and int64 labels, written in chunks (seeded numpy)."""
    import numpy as np

    d = workdir / f"gen-{n}"
    if (d / "done").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, rows in (("train", n), ("test", TEST_ROWS)):
        x = np.lib.format.open_memmap(d / f"{split}_x.npy", mode="w+", dtype=np.uint8,
                                      shape=(rows, *SHAPE))
        for i in range(0, rows, 4096):
            j = min(rows, i + 4096)
            x[i:j] = rng.integers(0, 256, (j - i, *SHAPE), dtype=np.uint8)
        x.flush()
        del x
        np.save(d / f"{split}_y.npy", rng.integers(0, NUM_CLASSES, rows, dtype=np.int64))
    (d / "done").write_text("ok")


def _library_order(n: int, seed: int):
    """The library's epoch-0 order for ``seed`` (TensorBatchLoader.order, world size 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


# ------------------------------------------------------------------ preparation
def _source(workdir: Path, n: int):
    from lightning_distill.data.datasets.sources import DatasetSource, SplitSource

    tx, ty, vx, vy = _generated(workdir, n)

    def split(x: Any, y: Any, files: list[str]) -> SplitSource:
        return SplitSource(int(x.shape[0]), SHAPE, lambda a, b: (x[a:b], y[a:b]), files=files,
                           labels=None)

    d = workdir / f"gen-{n}"
    return DatasetSource(
        name=f"bench{n}", class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        train=split(tx, ty, [str(d / "train_x.npy"), str(d / "train_y.npy")]),
        test=split(vx, vy, [str(d / "test_x.npy"), str(d / "test_y.npy")]),
        settings={"bench": n},
    )


def prep_memmap(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from lightning_distill.data.prepared import prepare

    root = workdir / f"memmap-{n}"
    shutil.rmtree(root, ignore_errors=True)
    source = _source(workdir, n)
    mem = _MemTrack()
    t = time.perf_counter()
    directory = prepare(source, root)
    wall = time.perf_counter() - t
    train = sum((directory / f).stat().st_size
                for f in ("train_images.u8", "train_labels.i64", "train_class_index.i64"))
    return {"wall_s": round(wall, 2), "bytes": _dir_bytes(directory), "train_bytes": train,
            "dir": str(directory), **mem.result()}


def _litdata_item(path: str, i: int) -> tuple[Any, int, int]:
    """One sample for litdata.optimize: (image uint8 [C, H, W], label, row)."""
    import numpy as np

    cache = _litdata_item.__dict__.setdefault("arrays", {})
    if path not in cache:
        cache[path] = (np.load(Path(path) / "train_x.npy", mmap_mode="r"),
                       np.load(Path(path) / "train_y.npy", mmap_mode="r"))
    x, y = cache[path]
    return np.ascontiguousarray(x[i]), int(y[i]), int(i)


def prep_litdata(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    import functools

    import litdata

    out = workdir / f"litdata-{n}"
    shutil.rmtree(out, ignore_errors=True)
    mem = _MemTrack()
    t = time.perf_counter()
    litdata.optimize(fn=functools.partial(_litdata_item, str(workdir / f"gen-{n}")),
                     inputs=list(range(n)), output_dir=str(out), chunk_bytes="64MB",
                     num_workers=1, verbose=False)
    wall = time.perf_counter() - t
    chunks = sorted(out.glob("*.bin"))
    return {"wall_s": round(wall, 2), "bytes": _dir_bytes(out), "train_bytes": _dir_bytes(out),
            "chunks": len(chunks), "dir": str(out), **mem.result(),
            "worker_maxrss_mb": round(_maxrss_mb(resource.RUSAGE_CHILDREN), 1),
            "litdata_version": litdata.__version__}


# ------------------------------------------------------------------ reading
def _check_batches(batches: list[tuple[Any, Any]], workdir: Path, n: int) -> bool:
    """Each sampled (rows, images) batch equals the generated rows."""
    import numpy as np

    tx = _generated(workdir, n)[0]
    return all(np.array_equal(np.asarray(x), tx[np.asarray(r)]) for r, x in batches)


def _random_draws(n: int, rows: int, repeats: int, seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, n, (rows,), generator=g) for _ in range(repeats)]


def _np_memmap(rows: Any) -> Any:
    """The same prepared file as a tensor over ``np.memmap`` (read-only copy-on-write
    pages), the reader the library used before its positioned reads."""
    import numpy as np
    import torch

    return torch.from_numpy(np.memmap(rows.path, dtype=np.uint8, mode="c",
                                      shape=tuple(rows.shape)))


def read_memmap(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The library's streamed path over a prepared split: its ``RowFile`` (positioned
    reads), or with ``--np-memmap`` the same file through ``np.memmap``."""
    import torch

    from lightning_distill.data.datamodule import SplitBatchLoader
    from lightning_distill.data.prepared import open_prepared
    from lightning_distill.data.splits import StreamedSplit

    torch.set_num_threads(1)
    directory = Path(json.loads(args.prep)["dir"])
    if args.cold:
        _drop_from_page_cache(directory)
    mem = _MemTrack()
    t_open = time.perf_counter()
    real = open_prepared(directory)
    codes = _np_memmap(real.train_data) if args.np_memmap else real.train_data
    split = StreamedSplit(codes, real.train_labels, torch.arange(n), lambda c: c)
    open_s = time.perf_counter() - t_open
    loader = SplitBatchLoader(split, args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed), pin_memory=False)
    order = loader.order()  # what iter() will draw: the same generator state, so
    loader.generator.manual_seed(args.seed)  # rewind it
    seen, sampled = 0, []
    t = time.perf_counter()
    for b, (x, _y) in enumerate(loader):
        seen += x.shape[0]
        mem.sample()
        if b % args.check_every == 0:
            sampled.append((order[b * args.batch_size:(b + 1) * args.batch_size], x))
    wall = time.perf_counter() - t
    res = {"epoch_s": round(wall, 3), "images_per_s": round(seen / wall), "rows": seen,
           "open_s": round(open_s, 4), **mem.result(),
           "batches_equal_source": _check_batches(sampled, workdir, n),
           "order_is_library_order": bool(torch.equal(order, _library_order(n, args.seed)))}
    # random access: rows of a fresh map (cold: dropped again, so from disk)
    if args.cold:
        _drop_from_page_cache(directory)
    codes = open_prepared(directory).train_data
    if args.np_memmap:
        codes = _np_memmap(codes)
    times = []
    for idx in _random_draws(n, args.random_rows, args.random_repeats, args.seed):
        t = time.perf_counter()
        codes.index_select(0, idx)
        times.append(time.perf_counter() - t)
    res["random_rows_ms_median"] = round(1e3 * statistics.median(times), 3)
    res["random_rows_ms_first"] = round(1e3 * times[0], 3)
    return res


def _streaming(directory: Path, seed: int, cache_dir: Path, batch_decode: Any = "auto"):
    import litdata

    return litdata.StreamingDataset(str(directory), shuffle=True, seed=seed,
                                    cache_dir=str(cache_dir), batch_decode=batch_decode)


def _decode(value: str) -> Any:
    return int(value) if value.isdigit() else value


def read_litdata(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    import litdata
    import torch

    torch.set_num_threads(1)
    directory = Path(json.loads(args.prep)["dir"])
    cache_dir = workdir / f"litdata-cache-{n}-{os.getpid()}"
    if args.cold:
        _drop_from_page_cache(directory)
    mem = _MemTrack()
    t_open = time.perf_counter()
    ds = _streaming(directory, args.seed, cache_dir, _decode(args.batch_decode))
    loader = litdata.StreamingDataLoader(ds, batch_size=args.batch_size,
                                         num_workers=args.workers)
    open_s = time.perf_counter() - t_open
    seen, rows, sampled = 0, [], []
    t = time.perf_counter()
    for b, (x, _y, r) in enumerate(loader):
        seen += x.shape[0]
        rows.append(r)
        mem.sample()
        if b % args.check_every == 0:
            sampled.append((r, x))
    wall = time.perf_counter() - t
    del loader  # workers end: RUSAGE_CHILDREN holds their peak
    order = torch.cat(rows)
    res: dict[str, Any] = {
        "epoch_s": round(wall, 3), "images_per_s": round(seen / wall), "rows": seen,
        "open_s": round(open_s, 4), **mem.result(),
        "batches_equal_source": _check_batches(sampled, workdir, n),
        "epoch_is_permutation": sorted(order.tolist()) == list(range(n)),
        "order_is_library_order": bool(order.numel() == n
                                       and torch.equal(order, _library_order(n, args.seed))),
    }
    if args.workers:
        res["worker_maxrss_mb"] = round(_maxrss_mb(resource.RUSAGE_CHILDREN), 1)
    elif args.batch_decode == "auto":
        res.update(_locality(order, n, args.batch_size, directory))
        res.update(_litdata_random(directory, cache_dir, n, args))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return res


def _locality(order: Any, n: int, bs: int, directory: Path) -> dict[str, Any]:
    """Distinct chunks per batch: LitData's order against the library's randperm."""
    import torch

    index = json.loads((directory / "index.json").read_text())
    sizes = [int(c["chunk_size"]) for c in index["chunks"]]
    bounds = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])

    def per_batch(o: Any) -> float:
        chunk = torch.bucketize(o, bounds[1:], right=True)
        return statistics.mean(len(set(chunk[i:i + bs].tolist())) for i in range(0, n, bs))

    return {"chunks": len(sizes), "rows_per_chunk": max(sizes),
            "chunks_per_batch_litdata": round(per_batch(order), 2),
            "chunks_per_batch_library": round(per_batch(_library_order(n, 0)), 2)}


def _litdata_random(directory: Path, cache_dir: Path, n: int, args: argparse.Namespace
                    ) -> dict[str, Any]:
    """``--random-repeats`` draws with ``batch_decode=0`` (one row decoded per call, the
    fast setting for random rows); 3 with the default ``"auto"``, which decodes a window
    of up to 256 rows around each row asked for."""
    import numpy as np

    out = {}
    for decode, repeats, key in ((0, args.random_repeats, ""), ("auto", 3, "_auto")):
        if args.cold:
            _drop_from_page_cache(directory)
        ds = _streaming(directory, args.seed, cache_dir, decode)
        times = []
        for idx in _random_draws(n, args.random_rows, repeats, args.seed):
            t = time.perf_counter()
            np.stack([ds[int(i)][0] for i in idx])
            times.append(time.perf_counter() - t)
        out[f"random_rows_ms_median{key}"] = round(1e3 * statistics.median(times), 3)
        out[f"random_rows_ms_first{key}"] = round(1e3 * times[0], 3)
    return out


def read_litdata_indexed(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The library's exact order (its SplitBatchLoader's) through StreamingDataset[i]."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    directory = Path(json.loads(args.prep)["dir"])
    cache_dir = workdir / f"litdata-cache-{n}-{os.getpid()}"
    if args.cold:
        _drop_from_page_cache(directory)
    ds = _streaming(directory, args.seed, cache_dir, batch_decode=0)  # one row per call
    mem = _MemTrack()
    order = _library_order(n, args.seed)
    bs, seen, sampled = args.batch_size, 0, []
    t = time.perf_counter()
    for b, i in enumerate(range(0, n, bs)):
        idx = order[i:i + bs]
        items = [ds[int(j)] for j in idx]
        x = torch.from_numpy(np.stack([it[0] for it in items]))
        seen += x.shape[0]
        mem.sample()
        if b % args.check_every == 0:
            sampled.append((idx, x))
            if not all(int(it[2]) == int(j) for it, j in zip(items, idx, strict=True)):
                raise RuntimeError("StreamingDataset[i] returned another row")
    wall = time.perf_counter() - t
    res = {"epoch_s": round(wall, 3), "images_per_s": round(seen / wall), "rows": seen,
           **mem.result(), "batches_equal_source": _check_batches(sampled, workdir, n),
           "order_is_library_order": True}
    shutil.rmtree(cache_dir, ignore_errors=True)
    return res


def litdata_ddp(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """LitData's 2-rank shards (each rank simulated in turn, as the library's own
    DistributedSampler-style shards are computed) against the library's."""
    import torch
    from litdata.utilities.env import _DistributedEnv

    from lightning_distill.data.datamodule import shard_indices

    directory = Path(json.loads(args.prep)["dir"])
    cache_dir = workdir / f"litdata-cache-{n}-{os.getpid()}"
    order = _library_order(n, args.seed)
    shards, equal = [], []
    for rank in range(2):
        ds = _streaming(directory, args.seed, cache_dir)
        ds.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
        ds.drop_last = True  # what StreamingDataset sets itself under a world size > 1
        rows = torch.tensor([int(item[2]) for item in ds])
        shards.append(rows)
        equal.append(bool(rows.numel() == math.ceil(n / 2)
                          and torch.equal(rows, shard_indices(order, rank, 2))))
    union = set(shards[0].tolist()) | set(shards[1].tolist())
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"rank_rows": [int(s.numel()) for s in shards],
            "library_rank_rows": [math.ceil(n / 2)] * 2,
            "overlap_rows": len(set(shards[0].tolist()) & set(shards[1].tolist())),
            "rows_never_read": n - len(union),
            "shards_equal_library": equal}


# ------------------------------------------------------------------ driver
CHILDREN = {"prep_memmap": prep_memmap, "prep_litdata": prep_litdata,
            "read_memmap": read_memmap, "read_litdata": read_litdata,
            "read_litdata_indexed": read_litdata_indexed, "litdata_ddp": litdata_ddp}


def _child(task: str, workdir: Path, n: int, args: argparse.Namespace, **extra: Any) -> dict:
    """Run ``task`` in a fresh interpreter; its result is the last stdout line (JSON)."""
    cmd = [sys.executable, __file__, "--_task", task, "--_n", str(n), "--workdir", str(workdir),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--random-rows", str(args.random_rows), "--random-repeats", str(args.random_repeats),
           "--check-every", str(args.check_every)]
    if args.cold:
        cmd.append("--cold")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"  {task} n={n} {extra.get('workers', '')}: {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    return res


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None or isinstance(v, dict):
        return "-"
    return f"{v:,.{nd}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def table(results: dict[str, Any]) -> str:
    lines = ["| N | reader | prepare s | MB on disk | epoch s | images/s | maxrss +MB | "
             "anon peak +MB | file peak +MB | 256 random rows ms | library order | "
             "batches = source |", "|" + "---|" * 12]
    for n, r in results["sizes"].items():
        for name, prep_key, read_key in (("prepared, positioned reads (library)", "prep_memmap",
                                          "read_memmap"),
                                         ("prepared, np.memmap", None, "read_np_memmap"),
                                         ("litdata w0", "prep_litdata", "read_litdata_w0"),
                                         ("litdata w0 batch_decode=0", None,
                                          "read_litdata_w0_bd0"),
                                         ("litdata w1", None, "read_litdata_w1"),
                                         ("litdata [i], library order", None,
                                          "read_litdata_indexed")):
            rd = r.get(read_key)
            if rd is None:
                continue
            pr = r.get(prep_key, {}) if prep_key else {}
            err = rd.get("error")
            if err:
                lines.append(f"| {n} | {name} | | | error: {err} |" + " |" * 7)
                continue
            lines.append(
                f"| {n} | {name} | {_fmt(pr.get('wall_s'), 1) if pr else ''} | "
                f"{_fmt(pr['bytes'] / 1e6, 1) if pr else ''} | {_fmt(rd['epoch_s'], 2)} | "
                f"{_fmt(rd['images_per_s'])} | {_fmt(rd['maxrss_growth_mb'])} | "
                f"{_fmt(rd['anon_peak_growth_mb'])} | {_fmt(rd['file_peak_growth_mb'])} | "
                f"{_fmt(rd.get('random_rows_ms_median'), 2)}"
                + (f" (auto: {_fmt(rd['random_rows_ms_median_auto'], 0)})"
                   if "random_rows_ms_median_auto" in rd else "") + " | "
                f"{'yes' if rd.get('order_is_library_order') else 'no'} | "
                f"{rd.get('batches_equal_source')} |")
    ratios = ["", "| N | prepare s memmap / litdata | disk memmap / litdata | images/s memmap / "
              "litdata w0 | images/s memmap / litdata w1 | images/s memmap / litdata [i] | "
              "random rows ms memmap / litdata |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in results["sizes"].items():
        pm, pl = r.get("prep_memmap", {}), r.get("prep_litdata", {})
        m = r.get("read_memmap", {})

        def ratio(a: Any, b: Any) -> str:
            return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
                and b else "-"

        def lit(key: str, what: str, r: dict = r) -> Any:
            return r.get(key, {}).get(what)

        ips, rnd = "images_per_s", "random_rows_ms_median"
        ratios.append(
            f"| {n} | {ratio(pm.get('wall_s'), pl.get('wall_s'))} | "
            f"{ratio(pm.get('bytes'), pl.get('bytes'))} | "
            f"{ratio(m.get(ips), lit('read_litdata_w0', ips))} | "
            f"{ratio(m.get(ips), lit('read_litdata_w1', ips))} | "
            f"{ratio(m.get(ips), lit('read_litdata_indexed', ips))} | "
            f"{ratio(m.get(rnd), lit('read_litdata_w0', rnd))} |")
    return "\n".join(lines + ratios)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-rows", type=int, default=256)
    p.add_argument("--random-repeats", type=int, default=20)
    p.add_argument("--check-every", type=int, default=16,
                   help="check every k-th batch against the generated rows")
    p.add_argument("--no-w1", action="store_true", help="skip StreamingDataLoader(num_workers=1)")
    p.add_argument("--cold", action="store_true",
                   help="drop this benchmark's files from the page cache before each read")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=None, help="JSON results")
    p.add_argument("--_task", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prep", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch-decode", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--np-memmap", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._task:
        print(json.dumps(CHILDREN[args._task](args.workdir, args._n, args)))
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="storage_readers-")
        args.workdir = Path(tmp)
    args.workdir.mkdir(parents=True, exist_ok=True)
    import litdata
    import numpy as np
    import torch

    results: dict[str, Any] = {
        "benchmark": "storage_readers", "date": datetime.date.today().isoformat(),
        "commit": _git_commit(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "litdata": litdata.__version__,
        "shape": SHAPE, "num_classes": NUM_CLASSES, "test_rows": TEST_ROWS,
        "batch_size": args.batch_size, "seed": args.seed, "random_rows": args.random_rows,
        "random_repeats": args.random_repeats, "cold": args.cold, "argv": sys.argv[1:],
        "sizes": {},
    }
    t0 = time.perf_counter()
    try:
        for n in args.sizes:
            t = time.perf_counter()
            generate(args.workdir, n, args.seed)
            print(f"  generate n={n}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
            r: dict[str, Any] = {}
            r["prep_memmap"] = _child("prep_memmap", args.workdir, n, args)
            r["prep_litdata"] = _child("prep_litdata", args.workdir, n, args)
            pm, pl = json.dumps(r["prep_memmap"]), json.dumps(r["prep_litdata"])
            r["read_memmap"] = _child("read_memmap", args.workdir, n, args, prep=pm)
            r["read_np_memmap"] = _child("read_memmap", args.workdir, n, args, prep=pm,
                                         np_memmap=1)
            r["read_litdata_w0"] = _child("read_litdata", args.workdir, n, args, prep=pl,
                                          workers=0)
            r["read_litdata_w0_bd0"] = _child("read_litdata", args.workdir, n, args, prep=pl,
                                              workers=0, batch_decode=0)
            if not args.no_w1:
                r["read_litdata_w1"] = _child("read_litdata", args.workdir, n, args, prep=pl,
                                              workers=1)
            r["read_litdata_indexed"] = _child("read_litdata_indexed", args.workdir, n, args,
                                               prep=pl)
            if n == min(args.sizes):
                r["litdata_ddp"] = _child("litdata_ddp", args.workdir, n, args, prep=pl)
            results["sizes"][str(n)] = r
            # this size's files go before the next size's are written
            for d in ("memmap", "litdata", "gen"):
                if tmp is not None:
                    shutil.rmtree(args.workdir / f"{d}-{n}", ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["load_avg_end"] = os.getloadavg()
    results["table"] = table(results)
    print(results["table"])
    small = results["sizes"].get(str(min(args.sizes)), {}).get("litdata_ddp")
    if small:
        print(f"\nLitData, 2 ranks (N = {min(args.sizes)}): {json.dumps(small)}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
