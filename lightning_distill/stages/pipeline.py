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
      - {name: ipc1, seeds: [0, 1, 2], ...}   # ipc1_s0, ipc1_s1, ipc1_s2
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

from ..errors import ConfigError, InputError
from ..io import atomic_write_text
from ._common import console, seed_dir_name

__all__ = ["RUN_KEYS", "compose_run", "merge", "run_pipeline", "stage_configs"]

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


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b]... = value`` for ``dotted = "a.b..."``; a segment inside a list is an
    index or the ``name`` of an entry (``distill.ipc10.model.iterations``)."""
    node: Any = data
    keys = dotted.split(".")
    for k, key in enumerate(keys):
        if isinstance(node, list):
            index = next((i for i, item in enumerate(node)
                          if isinstance(item, dict) and item.get("name") == key), None)
            if index is None and key.isdigit() and int(key) < len(node):
                index = int(key)
            if index is None:
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(f"--{dotted}: no entry {key!r} in {'.'.join(keys[:k])} "
                                  f"(entries: {names})")
            key = index
        elif k < len(keys) - 1:
            node.setdefault(key, {})
        if k == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


def compose_run(argv: Sequence[str]) -> dict[str, Any]:
    """The run recipe of a ``run`` command line: its ``--config`` files (already
    resolved) merged in order, then every ``--dotted.key value`` (a YAML value) set.
    Only the top level is checked here (:data:`RUN_KEYS`); each section is checked when
    its subcommand's LightningCLI parses it (:func:`run_pipeline`). ``--help`` and
    ``--print_config`` print and exit (SystemExit 0)."""
    args = [a for a in argv if a != "run"]
    if any(a in ("-h", "--help") for a in args):
        print("usage: lightning-distill run [--config FILE|RECIPE ...] [--KEY.PATH VALUE ...] "
              "[--print_config]\n\nexperts -> distill -> evaluate from one recipe "
              "(docs/recipes.md, 'run'): one section per stage in its subcommand's format, "
              "merged over the shared data / trainer; --distill.<name>.model.iterations 100 "
              "reaches a distillation by its name.\n\noptions: "
              + " ".join(f"--{k}" for k in RUN_KEYS))
        raise SystemExit(0)
    recipe: dict[str, Any] = {}
    printing = "--print_config" in args
    args = [a for a in args if a != "--print_config"]
    pairs = []
    for k, arg in enumerate(args):
        if not arg.startswith("--"):
            if k == 0 or "=" in args[k - 1] or not args[k - 1].startswith("--"):
                raise ConfigError(f"unexpected argument {arg!r}")
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if k + 1 >= len(args) or args[k + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value = args[k + 1]
        pairs.append((key, value))
    for key, value in pairs:
        if key == "config":
            data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{value}: a run recipe is a mapping")
            _check_keys(data, value)
            recipe = merge(recipe, data)
        else:
            _check_keys({key.split(".", 1)[0]: None}, "the command line")
            _set_path(recipe, key, yaml.safe_load(value))
    if printing:
        print(yaml.safe_dump(recipe, sort_keys=False), end="")
        raise SystemExit(0)
    return recipe


def _check_keys(data: dict[str, Any], where: str) -> None:
    import difflib

    for key in data:
        if key not in RUN_KEYS:
            close = difflib.get_close_matches(key, RUN_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}; a run recipe holds "
                              f"{', '.join(RUN_KEYS)}, each stage's section in its "
                              "subcommand's format")


def _has_callback(section: dict[str, Any], name: str) -> bool:
    callbacks = (section.get("trainer") or {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(str((c or {}).get("class_path", "")).rsplit(".", 1)[-1] == name
               for c in callbacks if isinstance(c, dict))


def stage_configs(recipe: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The run's stages as ``(subcommand, label, config)``: experts, every distillation,
    evaluate; each config the section merged over the shared part and the run's paths."""
    _check_keys(recipe, "run recipe")
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
        raise InputError("run recipe: `distill` is a list of distillations, each with a "
                         "`name` (its directory under workdir)")
    synthetic = []
    names = set()
    for k, section in enumerate(_expand_seeds(runs, work)):
        section = dict(section or {})
        name = section.pop("name", None)
        if not name or name in names:
            raise InputError(f"run recipe: distill[{k}] needs a `name` of its own (the "
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


def _expand_seeds(runs: list[Any], work: Path) -> list[Any]:
    """The distill entries with every ``seeds: [s, ...]`` entry replaced by one entry per
    seed: ``<name>_s<s>`` with ``seed_everything: s`` and ``model.seed: s`` (the same
    settings distilled from other seeds, for a mean over seeds)."""
    out = []
    for k, section in enumerate(runs):
        if not isinstance(section, dict) or "seeds" not in section:
            out.append(section)
            continue
        section = dict(section)
        seeds = section.pop("seeds")
        name = section.get("name")
        where = f"run recipe: distill[{k}] ({name!r})"
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise InputError(f"{where}: `seeds` must be a non-empty list of distinct "
                             f"integers, got {seeds!r}")
        if "seed_everything" in section or "seed" in (section.get("model") or {}):
            raise InputError(f"{where}: give `seeds` or `seed_everything` / `model.seed`, "
                             "not both (`seeds` sets both for each of its entries)")
        if "output" in section:
            raise InputError(f"{where}: `seeds` writes each seed to {work}/<name>_s<seed>; "
                             "drop `output`")
        for s in seeds:
            out.append(merge(section, {"name": seed_dir_name(name, s), "seed_everything": s,
                                       "model": {"seed": s}}))
    return out


def _chosen(path: str, selected: bool) -> str:
    best = Path(path).parent / "best.pt"
    return str(best) if selected and best.exists() else path


def run_pipeline(argv: Sequence[str], launch: Callable[[Sequence[str]], Any],
                 check: Callable[[Sequence[str]], Any]) -> None:
    """Run the stages of the ``run`` command line ``argv`` (:func:`compose_run`): write
    each merged section to ``workdir/configs/``, ``check(argv)`` every one (the
    subcommand's LightningCLI parses it: types and keys, nothing runs), then
    ``launch(argv)`` them in order, evaluating the validation-selected set of each
    distillation that has a PeriodicEvaluation."""
    recipe = compose_run(argv)
    stages = stage_configs(recipe)
    configs = Path(recipe.get("workdir") or "outputs/run") / "configs"
    commands = []
    for sub, label, cfg in stages:
        path = configs / f"{'distill_' + label.split(' ', 1)[1] if sub == 'distill' else sub}.yaml"
        if rank_zero_only.rank == 0:
            configs.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        commands.append([sub, "--config", str(path)])
    for command in commands:
        check(command)
    sets = [(str(Path(cfg["output"]) / "synthetic.pt"), _has_callback(cfg, "PeriodicEvaluation"))
            for sub, _, cfg in stages if sub == "distill"]
    for k, ((sub, label, _), command) in enumerate(zip(stages, commands, strict=True), 1):
        console.rule(f"[bold]{k}/{len(stages)} {label}")
        if sub == "evaluate":
            if rank_zero_only.rank != 0:
                return  # the evaluation is plain loops: rank 0 alone does it
            if (recipe.get("evaluate") or {}).get("synthetic") is None:
                # the run's own sets, validation-selected where possible
                chosen = [_chosen(path, selected) for path, selected in sets]
                command += ["--synthetic", yaml.safe_dump(chosen, default_flow_style=True)
                            .strip()]
        launch(command)
