"""`lightning-distill evaluate`: the evaluation protocol of docs/method.md, 'Evaluation protocol'.

Trains ``runs`` fresh networks of every architecture in ``models`` on each synthetic
set and tests them on the real test set, in the input space the set was distilled in
(normalisation or ZCA). Baselines under the same protocol:

- ``random``: a random real subset with the same ipc (lr ``random_lr``);
- ``full``: the whole training split (``full_epochs`` epochs, lr ``full_lr``, batch
  ``full_batch_size``), the lossless reference.

The ``runs`` networks of a row train ``group_size`` at a time as one vectorised model
(:func:`~lightning_distill.functional.evaluation.train_and_evaluate_group`), each with
its own seed (and, for ``random``, its own subset); ``group_size: 1`` trains them one at
a time.

Prints a table (mean +- std, population std as in the papers) and writes it to
``output`` (JSON, atomically; docs/formats.md, 'results.json'): per row and model the
runs' accuracies, their mean and std, and the per-class test accuracies (``class_accs``
per run, ``class_mean`` over the runs) that :func:`evaluate_synthetic` returns. Sets
distilled from several seeds (directories ``<name>_s<seed>``, as ``run`` names the
entries of ``seeds: [...]``) also get a line over their seeds (:func:`seed_groups`).

The file is rewritten after every row, so an interrupted evaluation resumes: a rerun
with the same ``output`` reuses each row whose numbers cannot differ (the same
configuration, data, device type and, for a distilled row, the same set file by
SHA-256) and trains only the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..artifacts import check_header, file_sha256, header, sha256
from ..data.splits import images_hash_part, images_view, split_labels
from ..data.synthetic import SyntheticSet
from ..errors import ConfigError, DataFormatError, InputError
from ..functional.evaluation import EvalProtocol, summarize
from ..io import atomic_write_json
from ..modules.evaluate import evaluate_synthetic
from ._common import SEED_DIR, console, prepare
from .scores import add_scores, print_scores, random_subsets

#: results.json's format (docs/formats.md, 'results.json')
RESULTS_FORMAT = "lightning_distill.results"
RESULTS_FORMAT_VERSION = 1


def architecture_kwargs(models: Sequence[str], model_kwargs: dict[str, dict[str, Any]],
                        sets: list[SyntheticSet]) -> dict[str, dict]:
    """``build_model`` keywords per evaluated model name.

    By default a model evaluated under the name the experts used (stored in the
    synthetic set's ``meta["model"]``) is built with the experts' keywords (width,
    depth, norm, ...); ``model_kwargs[name]`` overrides them.
    """
    out: dict[str, dict] = {}
    for syn in sets:
        model = dict(syn.meta.get("model") or {})
        name = model.pop("name", None)
        for key in ("channels", "num_classes", "image_size"):
            model.pop(key, None)
        if name is not None and name not in out:
            out[name] = model
    for name, kw in model_kwargs.items():
        out[name] = {**out.get(name, {}), **kw}
    return {name: kw for name, kw in out.items() if name in models}


def _row(label: str, kind: str, ipc: int | None, res: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "kind": kind, "ipc": ipc, "results": res}


#: the ``evaluate`` subcommand's own arguments and their defaults (the arguments of
#: ``DistillTrainer.evaluate``, which documents them; tests/test_cli_evaluate.py keeps
#: the two equal)
EVALUATE_OPTIONS: dict[str, Any] = {
    "synthetic": None, "models": None, "model_kwargs": None, "runs": 5, "baselines": None,
    "random_lr": 0.01, "full_epochs": 50, "full_lr": 0.01, "full_batch_size": 256,
    "output": None, "scores": True}


def evaluate_stage(model: Any, datamodule: Any, *, device: torch.device,
                   precision: Any = None, **options: Any) -> list[dict[str, Any]]:
    """The ``evaluate`` subcommand: every run is ``model`` (an
    :class:`~lightning_distill.EvalModule` without a set: its architecture, evaluation
    protocol and seed) trained on each set, ``runs`` networks per set and architecture
    (run r: seed + r), tested on ``datamodule``'s test split on ``device`` (in the
    Trainer's ``precision`` where the protocol leaves it unset). ``options``
    are the keys of :data:`EVALUATE_OPTIONS` (``DistillTrainer.evaluate`` documents
    them); the others keep their defaults."""
    from ..modules.evaluate import EvalModule

    unknown = sorted(set(options) - set(EVALUATE_OPTIONS))
    if unknown:
        raise InputError(f"evaluate: unknown option(s) {unknown}; the options: "
                         f"{', '.join(EVALUATE_OPTIONS)}")
    opts = {**EVALUATE_OPTIONS, **options}
    if not isinstance(model, EvalModule):
        raise InputError(f"evaluate needs an EvalModule, got {type(model).__name__}")
    if type(model) is not EvalModule:
        # the runs are trained by the evaluation protocol (K at a time, baselines beside
        # them), not by the module's own steps, which a subclass may change
        raise ConfigError(
            f"evaluate: model.class_path {type(model).__name__} is a subclass of EvalModule, "
            "whose steps this subcommand does not run (it trains the runs with the "
            "evaluation protocol); fit and test it with `lightning-distill fit --model "
            f"{type(model).__name__} --data lightning_distill.SyntheticDataModule` and "
            "`test`, or use EvalModule")
    if not isinstance(model.hparams.seed, int):
        raise ConfigError("evaluate: model.seed must be one int (run r uses seed + r)")
    if datamodule is None:
        raise ConfigError("evaluate needs the real data: a datamodule (data: in a recipe)")
    synthetic, models = opts["synthetic"], opts["models"]
    sets = [synthetic] if isinstance(synthetic, str) else list(synthetic or [])
    archs = [models] if isinstance(models, str) else list(models or [model.hparams.model])
    kwargs = {model.hparams.model: dict(model.hparams.model_kwargs or {})}
    for name, kw in (opts["model_kwargs"] or {}).items():
        kwargs[name] = {**kwargs.get(name, {}), **kw}
    baselines = list(opts["baselines"] or [])
    check_request(sets, baselines)
    prepare(datamodule, "test")
    seed = int(model.hparams.seed)
    options = {**opts, "synthetic": sets, "models": archs, "model_kwargs": kwargs,
               "baselines": baselines}
    output = options.pop("output")
    protocol = model.protocol.for_trainer(precision)
    config = {**options, "seed": seed, "protocol": protocol.as_kwargs(),
              "data": datamodule.name}
    return evaluate_sets(datamodule, protocol=protocol, seed=seed, device=device,
                         output=output, config=config, **options)


def check_request(synthetic: Sequence[str], baselines: Sequence[str]) -> None:
    """Refuse an evaluation with nothing to do or an unknown baseline."""
    unknown = set(baselines) - {"random", "full"}
    if unknown:
        raise InputError(f"baselines: unknown {sorted(unknown)}; use 'random' and/or 'full'")
    if not synthetic and not baselines:
        raise InputError("nothing to evaluate: give --synthetic FILE and/or --baselines")


def evaluate_sets(
    dm: Any, synthetic: Sequence[str], *, protocol: EvalProtocol, models: Sequence[str],
    model_kwargs: dict[str, dict[str, Any]], runs: int, seed: int, device: torch.device,
    baselines: Sequence[str] = (), random_lr: float = 0.01, full_epochs: int = 50,
    full_lr: float = 0.01, full_batch_size: int = 256, output: str | None = None,
    config: dict[str, Any] | None = None, scores: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate the sets at ``synthetic`` and the ``baselines`` (``random``: random real
    subsets of the same ipc, one per run; ``full``: the whole training split) on ``dm``'s
    test split (a set-up RealDataModule), ``runs`` networks per architecture under
    ``protocol``; with ``scores`` add DD-Ranking's scores to the distilled rows
    (:func:`~lightning_distill.stages.scores.add_scores`); print the table, write
    ``output`` (results.json) and return the rows."""
    check_request(synthetic, baselines)
    name = dm.name
    sets = []
    for path in synthetic:
        syn = SyntheticSet.load(path)
        source = syn.meta.get("dataset")
        if source is not None and str(source) != name:
            raise InputError(
                f"{path} was distilled from the data set {source!r}, but the evaluation "
                f"uses data.name={name!r}; pass --data.name {source} (with the same "
                "normalisation / ZCA settings as the distillation)")
        syn.check_compatible(channels=dm.channels, image_size=dm.image_size,
                             num_classes=dm.num_classes, input_space=dm.input_space)
        sets.append((path, syn))
    n_rows = len(sets) + ("full" in baselines) + (
        len({syn.ipc for _, syn in sets} or {1, 10}) if "random" in baselines else 0)
    progress = Progress(TextColumn("[bold]evaluation runs"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=rank_zero_only.rank != 0)
    task = progress.add_task("runs", total=n_rows * len(models) * runs)
    common = dict(models=list(models), runs=runs, seed=seed, device=device,
                  model_kwargs=architecture_kwargs(models, model_kwargs,
                                                   [syn for _, syn in sets]),
                  on_progress=lambda runs: progress.advance(task, runs))
    # hashing the splits costs a pass over the data: only when there is a file to resume
    identity = _identity(dm, config, device) if output else {}
    done = _finished_rows(output, identity)

    def save(rows: list[dict[str, Any]], complete: bool,
             groups: list[dict[str, Any]] | None = None) -> None:
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output, {
                **header(RESULTS_FORMAT, RESULTS_FORMAT_VERSION, dm.input_space.to_dict()),
                "config": config or {}, "identity": identity, "complete": complete,
                "rows": rows, **({"seed_groups": groups} if groups else {})})

    def reuse(key: str, label: str) -> dict[str, Any] | None:
        row = done.get(key)
        if row is not None:
            console.print(f"{label}: the row of {output} (same settings, data and set)")
            progress.advance(task, len(models) * runs)
        return row

    with progress:
        rows = _evaluate_rows(dm, sets, baselines, protocol, common, runs, seed, random_lr,
                              full_epochs, full_lr, full_batch_size, reuse=reuse,
                              on_row=lambda rows: save(rows, complete=False))
        if scores:
            add_scores(rows, dm, sets, protocol=protocol, common=common, runs=runs, seed=seed,
                       random_lr=random_lr, on_row=lambda rows: save(rows, complete=False),
                       grow=lambda n: progress.update(task, total=progress.tasks[0].total + n))
    print_table(rows, list(models), title=f"{name}: test accuracy (%), "
                f"mean +- std over {runs} networks")
    groups = seed_groups(rows, list(models))
    if groups:
        print_seed_groups(groups, list(models))
    if scores:
        print_scores(rows, list(models))
    if output:
        save(rows, complete=True, groups=groups)
        console.print(f"[green]results: {output}[/]")
    return rows


def _identity(dm: Any, config: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """What every row's numbers depend on besides its own training set: the evaluation
    settings (``config`` without the list of sets and baselines), the device type and
    the data (SHA-256 of the training and test splits' input-space images and labels,
    so another split or normalisation counts as other data). A streamed split is hashed
    in chunks to the digest of the same split held (docs/formats.md, 'results.json'):
    the networks see the same images either way, so a file written with the data held
    resumes with it streamed and vice versa."""
    splits = [dm.test_set]
    if getattr(dm, "train_set", None) is not None:
        splits.insert(0, dm.train_set)
    data = sha256(*(t for split in splits
                    for t in (images_hash_part(split), split_labels(split))))
    settings = {k: v for k, v in (config or {}).items()
                if k not in ("synthetic", "baselines", "scores")}
    # through JSON, so that it compares equal to what a results.json holds
    return json.loads(json.dumps({"settings": settings, "device": device.type,
                                  "data": data}))


def _row_key(row: dict[str, Any]) -> str:
    """A row's own training set: the random baseline of an ipc, the full training split,
    or the distilled set file's SHA-256."""
    if row["kind"] == "random":
        return f"random {row['ipc']}"
    return "full" if row["kind"] == "full" else f"distilled {row.get('sha256')}"


def _finished_rows(output: str | None, identity: dict[str, Any]) -> dict[str, dict]:
    """The rows of an earlier ``output`` written with the same ``identity``, by key."""
    if not output or not Path(output).exists():
        return {}
    try:
        previous = _check_results(json.loads(Path(output).read_text()), output)
    except (OSError, ValueError):  # DataFormatError is a ValueError
        return {}  # not ours, or unreadable: it is overwritten
    if previous.get("identity") != identity:
        return {}
    return {_row_key(row): row for row in previous["rows"]}


def _check_results(obj: Any, where: str | Path) -> dict[str, Any]:
    """``obj`` (read from ``where``) if it is a results.json this library reads
    (docs/formats.md, 'results.json'): the header, and ``rows`` a list of rows with a
    label, a kind and results; a file from before the header (no ``format`` and no
    ``format_version``) is read as version 1."""
    if isinstance(obj, dict) and "format" not in obj and "format_version" not in obj:
        obj = {**obj, "format": RESULTS_FORMAT, "format_version": 1}
    check_header(obj, RESULTS_FORMAT, RESULTS_FORMAT_VERSION, where,
                 fix="give a results.json written by `lightning-distill evaluate --output`")
    rows = obj.get("rows")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and {"label", "kind", "results"} <= r.keys() for r in rows):
        raise DataFormatError(f"{where}: 'rows' must be a list of rows, each with a label, "
                              "a kind and results; give a results.json written by "
                              "`lightning-distill evaluate --output`")
    return obj


def _evaluate_rows(dm, sets, baselines, protocol, common, runs, seed, random_lr, full_epochs,
                   full_lr, full_batch_size,
                   reuse: Callable[[str, str], dict[str, Any] | None] = lambda key, label: None,
                   on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
                   ) -> list[dict[str, Any]]:
    """The table's rows: the random-real baselines, the sets, the full-data baseline.

    ``reuse(key, label)`` returns a finished row to take instead of training (see
    :func:`_row_key`); ``on_row(rows)`` is called with the rows so far after each one."""
    name = dm.name
    # a held split's tensors; a streamed split's images read a batch at a time
    test_x, test_y = images_view(dm.test_set), split_labels(dm.test_set)
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        on_row(rows)

    if "random" in baselines:
        ipcs = sorted({syn.ipc for _, syn in sets}) or [1, 10]
        for ipc in ipcs:
            label = f"random real, ipc {ipc}"
            row = reuse(f"random {ipc}", label)
            if row is None:
                console.print(f"evaluating random real ipc {ipc} ...")
                res = _random_real(runs, seed, random_lr, dm, ipc, test_x, test_y, protocol,
                                   common)
                row = _row(label, "random", ipc, res)
            add(row)
    for path, syn in sets:
        digest = file_sha256(path)
        label = f"distilled, ipc {syn.ipc} ({path})"
        row = reuse(f"distilled {digest}", label)
        if row is None:
            console.print(f"evaluating {path} (ipc {syn.ipc}, lr {syn.lr:.4g}) ...")
            res = evaluate_synthetic(syn, test_x, test_y, protocol=protocol, **common)
            row = {**_row(label, "distilled", syn.ipc, res), "sha256": digest}
        add({**row, "label": label, "path": path})  # the same file may have moved
    if "full" in baselines:
        row = reuse("full", "full training set")
        if row is None:
            train_x, train_y = images_view(dm.train_set), split_labels(dm.train_set)
            held = isinstance(train_x, torch.Tensor)
            # a held split is the set; a streamed one cannot be: the set then carries the
            # lr, metadata and shapes (the split's first image) and the runs train on
            # train_data, read a batch at a time (the same batches, the same numbers)
            full = SyntheticSet(images=train_x if held else train_x[:1],
                                labels=train_y if held else train_y[:1], lr=full_lr,
                                meta={"dataset": name, "input_space": dm.input_space,
                                      "num_classes": dm.num_classes})
            console.print(f"evaluating the full training set ({train_x.shape[0]} images) ...")
            res = evaluate_synthetic(full, test_x, test_y, protocol=protocol,
                                     epochs=full_epochs, batch_size=full_batch_size,
                                     lr=full_lr, **common,
                                     **({} if held else {"train_data": (train_x, train_y)}))
            row = _row("full training set", "full", None, res)
        add(row)
    return rows


def _random_real(runs, seed, lr, dm, ipc, test_x, test_y, protocol, common
                 ) -> dict[str, Any]:
    """Random-real baseline: network r trains on its own random subset r (seed + r).

    Averaging over subsets as well as initialisations measures the baseline, not one
    lucky or unlucky draw (on digits, single ipc-10 draws range over ~3 points). The
    runs train as groups (one subset per member).
    """
    subsets = random_subsets(dm, seed, ipc, runs, lr)
    return evaluate_synthetic(subsets[0], test_x, test_y, protocol=protocol, lr=lr,
                              train_sets=[(s.images, s.labels) for s in subsets], **common)


def seed_groups(rows: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """The distilled rows of one configuration over distillation seeds: rows whose set
    lies in a directory ``<name>_s<seed>`` are grouped by the directory's parent,
    ``<name>`` and the file name (``best.pt`` apart from ``synthetic.pt``); a group
    needs two seeds or more. Per group and model: ``mean`` (over the seeds of each
    seed's mean), ``std`` (across those seed means, population std as for networks),
    ``std_within`` (the mean of the seeds' evaluation std) and ``seed_means``."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("kind") != "distilled" or "path" not in row:
            continue
        path = Path(row["path"])
        m = SEED_DIR.match(path.parent.name)
        if m is None:
            continue
        key = (str(path.parent.parent), m["name"], path.name)
        g = groups.setdefault(key, {"name": m["name"], "file": path.name,
                                    "ipc": row["ipc"], "members": {}})
        g["members"][int(m["seed"])] = row
    out = []
    for g in groups.values():
        members = sorted(g.pop("members").items())
        if len(members) < 2:
            continue
        g.update(seeds=[s for s, _ in members], paths=[r["path"] for _, r in members],
                 label=f"distilled, ipc {g['ipc']}, {g['name']} ({len(members)} seeds)")
        g["results"] = {}
        for model in models:
            means = [r["results"][model]["mean"] for _, r in members]
            mean, std = summarize(means)
            within = [r["results"][model]["std"] for _, r in members]
            g["results"][model] = {"mean": mean, "std": std,
                                   "std_within": sum(within) / len(within),
                                   "seed_means": means}
        out.append(g)
    return out


def print_seed_groups(groups: list[dict[str, Any]], models: list[str]) -> None:
    table = Table(title="over distillation seeds: mean +- std across the seeds' means "
                        "(mean evaluation std within a seed)")
    table.add_column("configuration")
    for m in models:
        table.add_column(m, justify="right")
    for g in groups:
        table.add_row(g["label"], *(
            f"{100 * r['mean']:.1f} +- {100 * r['std']:.1f} ({100 * r['std_within']:.1f})"
            for r in (g["results"][m] for m in models)))
    console.print(table)


def print_table(rows: list[dict[str, Any]], models: list[str], title: str) -> None:
    table = Table(title=title)
    table.add_column("training set")
    for m in models:
        table.add_column(m, justify="right")
    for row in rows:
        cells = [f"{100 * r['mean']:.1f} +- {100 * r['std']:.1f}"
                 for r in (row["results"][m] for m in models)]
        table.add_row(row["label"], *cells)
    console.print(table)


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file written by :func:`evaluate` (checked: :func:`_check_results`)."""
    try:
        obj = json.loads(Path(path).read_text())
    except ValueError as e:
        raise DataFormatError(f"{path}: not JSON ({e}); give a results.json written by "
                              "`lightning-distill evaluate --output`") from None
    return _check_results(obj, path)["rows"]
