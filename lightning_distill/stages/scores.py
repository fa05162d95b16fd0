"""DD-Ranking's scores in the ``evaluate`` stage (docs/method.md, 'DD-Ranking's scores').

For every distilled row of the table, the extra evaluation runs the scores need, under
the same protocol, seeds and architectures as the row itself:

- ``syn_hard``: the set's images with hard labels (:attr:`SyntheticSet.hard_labels`) and
  the set's lr; for a hard-label set this is the row itself (no extra run);
- ``random``: random real subsets of the set's ipc (subset r for run r, the random
  baseline's draw) given the same kind of labels as the set, at ``random_lr``: hard
  labels (the random baseline row itself when the table has it), or, for a soft-label
  set, DATM's soft labels from the experts of the set's ``source_store``;
- ``syn_other_aug`` / ``random_other_aug``: both again with the augmentation switched
  (off under a protocol with DSA, on under one without).

The full data's hard-label accuracy is the ``full`` baseline row; without it HLR and LRS
are left out. A soft-label set without a readable ``source_store`` gets HLR only. Runs
that several sets share (the random subsets of an ipc and label kind) are trained once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.table import Table
from torch import Tensor
from torch.func import functional_call

from ..data.splits import images_view, split_labels
from ..data.synthetic import SyntheticSet
from ..errors import LightningDistillError, MissingFileError
from ..functional.evaluation import EvalProtocol, summarize
from ..functional.initialization import soft_label_logits
from ..functional.ranking import hard_label_recovery, ranking_scores
from ..modules.evaluate import evaluate_synthetic
from ..seeding import derive_seed
from ..trajectories import TrajectoryStore
from ._common import console

__all__ = ["add_scores", "print_scores", "random_subsets", "soft_labeller"]


def random_subsets(dm: Any, seed: int, ipc: int, runs: int, lr: float) -> list[SyntheticSet]:
    """The random-real baseline's subsets: subset r (for run r) holds ``ipc`` random
    training images per class, drawn from ``derive_seed(seed, ipc, r)`` (of a streamed
    split only the chosen rows are read)."""
    train_x, train_y = images_view(dm.train_set), split_labels(dm.train_set)
    return [SyntheticSet.from_real(
        train_x, train_y, ipc, dm.num_classes,
        generator=torch.Generator().manual_seed(derive_seed(seed, ipc, r)), lr=lr,
        meta={"dataset": dm.name, "input_space": dm.input_space}) for r in range(runs)]


def soft_labeller(store_path: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(images, class_ids) -> logits``: DATM's soft labels from every expert of the
    store (:func:`~lightning_distill.functional.initialization.soft_label_logits`: the
    mean logits of the experts that classify an image as its class)."""
    store = TrajectoryStore.open(store_path)
    net = store.build_model()
    experts = store.expert_indices()

    def logits(expert: int, x: Tensor) -> Tensor:
        params = store.spec.unflatten(store.final_snapshot(expert).to(x.dtype))
        with torch.no_grad():
            return torch.cat([functional_call(net, params, (x[i:i + 512],))
                              for i in range(0, x.shape[0], 512)])

    return lambda images, ids: soft_label_logits(images, ids, experts, logits)


def _accs(results: dict[str, dict], models: list[str]) -> dict[str, list[float]]:
    return {m: list(results[m]["accs"]) for m in models}


def add_scores(rows: list[dict[str, Any]], dm: Any, sets: list[tuple[str, SyntheticSet]], *,
               protocol: EvalProtocol, common: dict[str, Any], runs: int, seed: int,
               random_lr: float, grow: Callable[[int], None] = lambda n: None,
               on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> None:
    """Add ``"scores"`` to every distilled row of ``rows`` that lacks them (a row reused
    from an earlier results.json keeps its own): per architecture the scores of
    :func:`~lightning_distill.functional.ranking.ranking_scores` and the accuracies of
    the extra runs (``"accs"``), or a ``"note"`` saying why a score is missing.
    ``common`` holds :func:`evaluate_synthetic`'s shared arguments (``models``,
    ``runs``, ``seed``, ``device``, ``model_kwargs``, ``on_progress``); ``grow(n)`` is told
    of ``n`` more runs before they train; ``on_row(rows)`` after each set."""
    test_x, test_y = images_view(dm.test_set), split_labels(dm.test_set)
    models = list(common["models"])
    other = {"dsa": not protocol.dsa}
    full = next((r for r in rows if r["kind"] == "full"), None)
    cache: dict[tuple, dict[str, list[float]]] = {}

    def run(syn: SyntheticSet, **kw: Any) -> dict[str, list[float]]:
        grow(len(models) * runs)
        return _accs(evaluate_synthetic(syn, test_x, test_y, protocol=protocol, **common,
                                        **kw), models)

    def random_runs(ipc: int, store: str | None, aug: bool) -> dict[str, list[float]]:
        key = (ipc, store, aug)
        if key not in cache:
            given = next((r for r in rows if r["kind"] == "random" and r["ipc"] == ipc), None)
            if store is None and aug == protocol.dsa and given is not None:
                cache[key] = _accs(given["results"], models)
            else:
                subsets = random_subsets(dm, seed, ipc, runs, random_lr)
                if store is not None:
                    label = soft_labeller(store)
                    subsets = [SyntheticSet(s.images, label(s.images, s.labels), s.lr, s.meta)
                               for s in subsets]
                kw = {} if aug == protocol.dsa else other
                cache[key] = run(subsets[0], lr=random_lr,
                                 train_sets=[(s.images, s.labels) for s in subsets], **kw)
        return cache[key]

    for row, (path, syn) in zip([r for r in rows if r["kind"] == "distilled"], sets,
                                strict=True):
        if "scores" in row:
            continue
        console.print(f"scores of {path} (DD-Ranking: HLR, IOR, LRS, ARS) ...")
        syn_accs = _accs(row["results"], models)
        syn_hard = syn_accs if not syn.soft else run(
            SyntheticSet(syn.images, syn.hard_labels, syn.lr, syn.meta))
        notes, store = [], None
        if syn.soft:
            store = syn.meta.get("source_store")
            try:
                if store is None:
                    raise MissingFileError("the set names no source_store")
                TrajectoryStore.open(store)
            except (LightningDistillError, OSError) as e:
                notes.append(f"IOR, LRS, ARS need the experts' soft labels for the random "
                             f"subsets: {e} (import the set with --store)")
                store = False
        if full is None:
            notes.append("HLR and LRS need the full-data row: add 'full' to baselines")
        scores: dict[str, Any] = {}
        if store is not False:
            rand = random_runs(syn.ipc, store, protocol.dsa)
            syn_other = run(syn, **other)
            rand_other = random_runs(syn.ipc, store, not protocol.dsa)
            for m in models:
                scores[m] = ranking_scores(
                    syn=syn_accs[m], syn_hard=syn_hard[m], random=rand[m],
                    syn_other_aug=syn_other[m], random_other_aug=rand_other[m],
                    full_hard=None if full is None else full["results"][m]["accs"],
                    protocol_augments=protocol.dsa)
                scores[m]["accs"] = {"syn_hard": syn_hard[m], "random": rand[m],
                                     "syn_other_aug": syn_other[m],
                                     "random_other_aug": rand_other[m]}
        else:
            for m in models:
                hlr = None
                if full is not None:
                    values = [hard_label_recovery(f, h) for f, h in zip(
                        full["results"][m]["accs"], syn_hard[m], strict=True)]
                    mean, std = summarize(values)
                    hlr = {"values": values, "mean": mean, "std": std}
                scores[m] = {"hlr": hlr, "ior": None, "ior_other_aug": None, "lrs": None,
                             "ars": None, "accs": {"syn_hard": syn_hard[m]}}
        if notes:
            scores["note"] = "; ".join(notes)
            console.print(f"[yellow]{path}: {scores['note']}[/]")
        row["scores"] = scores
        on_row(rows)


def print_scores(rows: list[dict[str, Any]], models: list[str]) -> None:
    """The scores of the distilled rows as a table: HLR and IOR in percentage points,
    LRS and ARS times 100 (mean +- std over the runs)."""
    scored = [r for r in rows if r.get("scores")]
    if not scored:
        return
    table = Table(title="DD-Ranking scores, mean +- std over the runs: HLR, IOR in points "
                        "(HLR lower, IOR higher is better), LRS, ARS x 100 (higher is better)")
    table.add_column("training set")
    table.add_column("model")
    for name in ("HLR", "IOR", "LRS", "ARS"):
        table.add_column(name, justify="right")
    for row in scored:
        for m in models:
            s = row["scores"].get(m) or {}
            cells = [f"{100 * s[k]['mean']:.1f} +- {100 * s[k]['std']:.1f}" if s.get(k)
                     else "-" for k in ("hlr", "ior", "lrs", "ars")]
            table.add_row(row["label"], m, *cells)
    console.print(table)
