"""Converters of recipes in the format before LightningCLI (the stage dataclasses'
fields) to the LightningCLI configs of the same runs (docs/recipes.md, 'From the older
recipe format'). Each takes the older recipe as a dict (``yaml.safe_load`` of the file)
and returns the new one; the CLI refuses an older file and points here::

    import yaml
    from lightning_distill.stages.migrate import convert_distill_recipe

    new = convert_distill_recipe(yaml.safe_load(open("old_ipc10.yaml")))
    open("ipc10.yaml", "w").write(yaml.safe_dump(new, sort_keys=False))
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

__all__ = ["convert_distill_recipe", "convert_evaluate_recipe", "convert_experts_recipe",
           "convert_run_recipe"]


def convert_distill_recipe(old: dict[str, Any]) -> dict[str, Any]:
    """A ``distill`` recipe of the format before LightningCLI (the keys of
    ``stages.distill.DistillConfig``) as the LightningCLI config of the same run
    (docs/recipes.md, 'From the older recipe format'):

    - ``store``, ``distill.*``, ``seed`` -> ``model.*`` (DistillationModule's arguments;
      ``window.max_start_epoch`` also -> ``model.max_start_epoch``);
    - ``window`` -> a MatchingWindow callback, ``ema`` (enabled) -> SyntheticEMA,
      ``evaluation`` (every_n_steps > 0) -> PeriodicEvaluation (its epochs / batch_size
      / group_size in ``protocol``), ``image_every_n_steps`` -> SyntheticImageLogger,
      ``checkpoint_every_n_steps`` -> IterationCheckpoint;
    - ``data`` -> ``data`` (``split_seed`` as is, ``kwargs`` -> ``dataset_kwargs``),
      ``trainer`` -> ``trainer``, ``seed`` -> ``seed_everything``; ``output``, ``resume``
      unchanged.
    """
    from ..modules.distill import DistillationModule
    from .distill import DistillConfig

    base = DistillConfig()
    seed = old.get("seed", base.seed)
    new: dict[str, Any] = {"seed_everything": seed}
    if "output" in old:
        new["output"] = old["output"]
    if "resume" in old:
        new["resume"] = old["resume"]
    model: dict[str, Any] = {"store": old.get("store", base.store)}
    # the old settings' defaults where they differ from the module's (iterations)
    params = inspect.signature(DistillationModule).parameters
    for key, value in dataclasses.asdict(base.distill).items():
        if key in params and params[key].default != value:
            model[key] = value
    model.update(old.get("distill") or {})
    window = dict(old.get("window") or {})
    model["max_start_epoch"] = window.get("max_start_epoch",
                                          base.window.max_start_epoch)
    model["seed"] = seed
    new["model"] = model
    data = dict(old.get("data") or {})
    if "kwargs" in data:
        data["dataset_kwargs"] = data.pop("kwargs")
    new["data"] = data
    callbacks: list[dict[str, Any]] = []

    def add(name: str, **init_args: Any) -> None:
        callbacks.append({"class_path": f"lightning_distill.callbacks.{name}",
                          "init_args": init_args})

    w = {**dataclasses.asdict(base.window), **window}
    add("MatchingWindow", **{k: v for k, v in w.items() if v is not None})
    ema = {**dataclasses.asdict(base.ema), **(old.get("ema") or {})}
    if ema.pop("enabled"):
        add("SyntheticEMA", **ema)
    ev = {**dataclasses.asdict(base.evaluation), **(old.get("evaluation") or {})}
    if ev["every_n_steps"] > 0:
        add("PeriodicEvaluation", every_n_steps=ev["every_n_steps"], model=ev["model"],
            runs=ev["runs"], seed=seed,
            protocol={k: ev[k] for k in ("epochs", "batch_size", "group_size")})
    add("SyntheticImageLogger",
        every_n_steps=old.get("image_every_n_steps", base.image_every_n_steps))
    add("IterationCheckpoint",
        every_n=old.get("checkpoint_every_n_steps", base.checkpoint_every_n_steps))
    trainer = dict(old.get("trainer") or {})
    trainer["callbacks"] = callbacks
    new["trainer"] = trainer
    return new


def convert_experts_recipe(old: dict[str, Any]) -> dict[str, Any]:
    """An ``experts`` recipe of the format before LightningCLI (the keys of
    ``stages.experts.ExpertsConfig``) as the LightningCLI config of the same experts
    (docs/recipes.md, 'From the older recipe format'): ``model.name`` / ``kwargs`` and
    ``experts.lr`` / ``momentum`` / ``weight_decay`` / ``dsa`` / ``dsa_strategy`` ->
    ``model.*`` (ExpertTrajectoryModule's arguments); ``experts.epochs`` and
    ``check_val_every_n_epoch`` -> ``trainer.*``; ``sharpness`` -> a SAM / ASAM / GSAM
    callback; ``store``, ``log_dir``, ``seed``, ``shard_index``, ``num_shards``,
    ``data_selection``, ``experts.num_experts`` / ``group_size`` -> top-level keys."""
    from .experts import ExpertsConfig

    base = ExpertsConfig()
    ex = {**dataclasses.asdict(base.experts), **(old.get("experts") or {})}
    mdl = {**dataclasses.asdict(base.model), **(old.get("model") or {})}
    sharp = {**dataclasses.asdict(base.sharpness), **(old.get("sharpness") or {})}
    seed = old.get("seed", base.seed)
    new: dict[str, Any] = {"seed_everything": seed,
                           "store": old.get("store", base.store),
                           "log_dir": old.get("log_dir", base.log_dir),
                           "num_experts": ex["num_experts"], "group_size": ex["group_size"],
                           "seed": seed}
    for key in ("shard_index", "num_shards", "data_selection"):
        if key in old:
            new[key] = old[key]
    model: dict[str, Any] = {"model": mdl["name"]}
    if mdl.get("kwargs"):
        model["model_kwargs"] = mdl["kwargs"]
    model.update({k: ex[k] for k in ("lr", "momentum", "weight_decay", "dsa", "dsa_strategy")
                  if k in (old.get("experts") or {})})
    new["model"] = model
    data = dict(old.get("data") or {})
    if "kwargs" in data:
        data["dataset_kwargs"] = data.pop("kwargs")
    new["data"] = data
    trainer = dict(old.get("trainer") or {})
    trainer["max_epochs"] = ex["epochs"]
    if ex["check_val_every_n_epoch"] != 1:
        trainer["check_val_every_n_epoch"] = ex["check_val_every_n_epoch"]
    method = str(sharp["method"]).lower()
    if method != "none":
        args = {"rho": sharp["rho"], **({"alpha": sharp["alpha"]} if method == "gsam" else {})}
        trainer["callbacks"] = [{"class_path": f"lightning_distill.callbacks.{method.upper()}",
                                 "init_args": args}]
    new["trainer"] = trainer
    return new


def convert_evaluate_recipe(old: dict[str, Any]) -> dict[str, Any]:
    """An ``evaluate`` recipe of the format before LightningCLI (the keys of
    ``stages.evaluate.EvaluateConfig``) as the LightningCLI config of the same
    evaluation: ``epochs`` / ``batch_size`` / ``lr`` / ``dsa`` / ``group_size`` ->
    ``model.protocol`` and ``seed`` -> ``model.seed`` (EvalModule's arguments; the first
    of ``models`` -> ``model.model``), ``device`` -> ``trainer.accelerator`` /
    ``devices``, ``data`` -> ``data``; ``synthetic``, ``models``, ``model_kwargs``,
    ``runs``, ``baselines``, ``random_lr``, ``full_*``, ``output`` stay top-level keys."""
    from .evaluate import EvaluateConfig

    base = dataclasses.asdict(EvaluateConfig())
    cfg = {**base, **old}
    models = [cfg["models"]] if isinstance(cfg["models"], str) else list(cfg["models"])
    new: dict[str, Any] = {"seed_everything": cfg["seed"]}
    for key in ("synthetic", "models", "model_kwargs", "runs", "baselines", "random_lr",
                "full_epochs", "full_lr", "full_batch_size", "output"):
        if key in old:
            new[key] = old[key]
    new["model"] = {"model": models[0] if models else "ConvNet",
                    "protocol": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "dsa",
                                                     "group_size")},
                    "seed": cfg["seed"]}
    data = dict(old.get("data") or {})
    if "kwargs" in data:
        data["dataset_kwargs"] = data.pop("kwargs")
    new["data"] = data
    device = str(cfg["device"])
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        trainer: dict[str, Any] = {"accelerator": "gpu",
                                   "devices": [int(index)] if index else 1}
    else:
        trainer = {"accelerator": device, "devices": 1}
    new["trainer"] = trainer
    return new


def convert_run_recipe(old: dict[str, Any]) -> dict[str, Any]:
    """A ``run`` recipe of the format before LightningCLI (``stages.run.RunConfig``) as
    a run recipe of sections (docs/recipes.md, 'run'): ``experts`` from the experts part
    (:func:`convert_experts_recipe`), ``distill`` from ``runs`` (each with its name,
    :func:`convert_distill_recipe`), ``evaluate`` (:func:`convert_evaluate_recipe`);
    ``data``, ``trainer``, ``workdir``, ``seed`` stay shared."""
    seed = old.get("seed", 0)
    data = dict(old.get("data") or {})
    trainer = dict(old.get("trainer") or {})
    new: dict[str, Any] = {"workdir": old.get("workdir", "outputs/run"), "seed": seed}
    ex = convert_experts_recipe({**{k: old[k] for k in ("experts", "model", "sharpness",
                                                        "data_selection") if k in old},
                                 "data": data, "trainer": trainer, "seed": seed})
    shared_new = convert_experts_recipe({"data": data})["data"]
    new["data"] = shared_new
    new["trainer"] = trainer
    section = {k: v for k, v in ex.items()
               if k not in ("seed_everything", "store", "log_dir", "seed", "data")}
    section["trainer"] = {k: v for k, v in ex["trainer"].items() if k not in trainer}
    new["experts"] = section
    runs = []
    for r in old.get("runs") or []:
        d = convert_distill_recipe({
            **{k: r[k] for k in ("distill", "window", "ema", "evaluation") if k in r},
            **{k: old[k] for k in ("checkpoint_every_n_steps", "image_every_n_steps")
               if k in old}, "seed": seed})
        model = {k: v for k, v in d["model"].items() if k not in ("store", "seed")}
        runs.append({"name": r.get("name", "ipc10"), "model": model,
                     "trainer": {"callbacks": d["trainer"]["callbacks"]}})
    new["distill"] = runs
    ev = convert_evaluate_recipe({**(old.get("evaluate") or {}), "seed": seed})
    # the run fills the sets to evaluate and results.json unless they are given
    new["evaluate"] = {k: v for k, v in ev.items()
                       if k not in ("seed_everything", "data", "trainer")
                       and not (k in ("synthetic", "output") and not v)}
    new["evaluate"]["model"].pop("seed", None)
    return new
