"""`lightning-distill run`: experts -> distill -> evaluate from one recipe.

A run recipe holds one section per stage, each in that subcommand's own format (a
LightningCLI config: docs/recipes.md), plus what they share::

    workdir: outputs/digits          # experts/, <name>/ per distillation, results.json
    seed: 0                          # the base seed of every stage
    data: {name: digits}             # shared RealDataModule arguments
    trainer: {accelerator: cpu}      # shared Trainer arguments
    experts: {num_experts: 8, model: {...}, trainer: {max_epochs: 30, callbacks: [...]}}
    distill:                         # one entry per synthetic set, with its name
      - {name: ipc10, model: {ipc: 10, ...}, trainer: {callbacks: [...]}}
    evaluate: {runs: 5, baselines: [random, full], model: {protocol: {...}}}

Each section is the shared part merged with the section (the section wins; mappings
merge key by key, lists are replaced) plus the run's paths (the store under
``workdir``, each set's ``output``, the sets to evaluate, ``results.json``) where the
section leaves them unset. The merged sections are written to ``workdir/configs/``
(``experts.yaml``, ``distill_<name>.yaml``, ``evaluate.yaml``): each one reruns its
stage alone with ``lightning-distill <stage> --config``. All sections are parsed before
any work starts, so a typo in the last one fails at once. Every stage resumes what is
on disk (experts present, finished or checkpointed sets), so rerunning the command
resumes the run. Under DDP every rank trains and distils; global rank 0 evaluates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning.utilities import rank_zero_only

from ..io import atomic_write_text
from ._common import console

__all__ = ["RUN_KEYS", "merge", "run_pipeline", "stage_configs"]

#: the top-level keys of a run recipe
RUN_KEYS = ("workdir", "seed", "data", "trainer", "experts", "distill", "evaluate")


def merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key (recursively), anything else
    (lists, values) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _has_callback(section: dict[str, Any], name: str) -> bool:
    callbacks = (section.get("trainer") or {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(str((c or {}).get("class_path", "")).rsplit(".", 1)[-1] == name
               for c in callbacks if isinstance(c, dict))


def stage_configs(recipe: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The run's stages as ``(subcommand, label, config)``: experts, every distillation,
    evaluate; each config the section merged over the shared part and the run's paths."""
    unknown = [k for k in recipe if k not in RUN_KEYS]
    if unknown:
        raise ValueError(f"run recipe: unknown keys {unknown}; a run recipe holds "
                         f"{', '.join(RUN_KEYS)} (docs/recipes.md, 'run')")
    work = Path(recipe.get("workdir") or "outputs/run")
    seed = int(recipe.get("seed", 0))
    shared = {"data": dict(recipe.get("data") or {}),
              "trainer": dict(recipe.get("trainer") or {}), "seed_everything": seed}
    experts = dict(recipe.get("experts") or {})
    store = str(experts.get("store") or work / "experts")
    ex = merge(merge(shared, {"store": store, "log_dir": str(work / "logs"), "seed": seed}),
               experts)
    out: list[tuple[str, str, dict[str, Any]]] = [("experts", "experts", ex)]
    runs = recipe.get("distill") or []
    if not isinstance(runs, list):
        raise ValueError("run recipe: `distill` is a list of distillations, each with a "
                         "`name` (its directory under workdir)")
    synthetic = []
    names = set()
    for k, section in enumerate(runs):
        section = dict(section or {})
        name = section.pop("name", None)
        if not name or name in names:
            raise ValueError(f"run recipe: distill[{k}] needs a `name` of its own (the "
                             f"directory under {work}); got {name!r}")
        names.add(name)
        d = merge(merge(shared, {"output": str(work / name),
                                 "model": {"store": store, "seed": seed}}), section)
        out.append(("distill", f"distill {name}", d))
        synthetic.append(str(Path(d["output"]) / "synthetic.pt"))
    ex_model = dict(ex.get("model") or {})
    arch = {k: ex_model[k] for k in ("model", "model_kwargs") if k in ex_model}
    ev = merge(merge(shared, {"output": str(work / "results.json"),
                              "model": {**arch, "seed": seed}}),
               dict(recipe.get("evaluate") or {}))
    # the final sets; run_pipeline passes the validation-selected best.pt where there is one
    ev.setdefault("synthetic", synthetic)
    out.append(("evaluate", "evaluate", ev))
    return out


def _chosen(path: str, selected: bool) -> str:
    best = Path(path).parent / "best.pt"
    return str(best) if selected and best.exists() else path


def run_pipeline(recipe: dict[str, Any],
                 launch: Callable[[str, Sequence[str]], Any],
                 check: Callable[[str, Sequence[str]], Any]) -> None:
    """Run the stages of ``recipe``: write each merged section to
    ``workdir/configs/``, ``check(subcommand, argv)`` every one (parse only), then
    ``launch(subcommand, argv)`` them in order (the CLI's LightningCLI), evaluating the
    validation-selected set of each distillation that has a PeriodicEvaluation."""
    stages = stage_configs(recipe)
    configs = Path(recipe.get("workdir") or "outputs/run") / "configs"
    files = []
    for sub, label, cfg in stages:
        name = "distill_" + label.split(" ", 1)[1] if sub == "distill" else sub
        path = configs / f"{name}.yaml"
        if rank_zero_only.rank == 0:
            configs.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        files.append(path)
    for (sub, _, _), path in zip(stages, files, strict=True):
        check(sub, [sub, "--config", str(path)])
    selected = [(str(Path(cfg["output"]) / "synthetic.pt"),
                 _has_callback(cfg, "PeriodicEvaluation"))
                for sub, _, cfg in stages if sub == "distill"]
    n = len(stages)
    for k, ((sub, label, _), path) in enumerate(zip(stages, files, strict=True), 1):
        console.rule(f"[bold]{k}/{n} {label}")
        argv = [sub, "--config", str(path)]
        if sub == "evaluate":
            if rank_zero_only.rank != 0:
                return  # the evaluation is plain loops: rank 0 alone does it
            given = (recipe.get("evaluate") or {}).get("synthetic")
            if given is None:  # the run's own sets, validation-selected where possible
                argv += ["--synthetic", yaml.safe_dump(
                    [_chosen(p, s) for p, s in selected], default_flow_style=True).strip()]
        launch(sub, argv)
