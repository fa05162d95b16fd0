"""The ``lightning-distill`` command line.

    lightning-distill experts  --config recipes/digits/experts.yaml
    lightning-distill distill  --config recipes/digits/ipc10.yaml
    lightning-distill evaluate --config recipes/digits/evaluate.yaml
    lightning-distill run      --config recipes/digits/quickstart.yaml

Each stage takes one or more ``--config FILE.yaml`` (later files override earlier
ones), dotted overrides such as ``--data.root /data --trainer.devices 2`` and
``--print_config`` to show the merged configuration. The configuration of a stage is
a dataclass (``lightning_distill.stages.*``), parsed with jsonargparse, the engine of
Lightning's own LightningCLI; the stages are plain functions around Lightning
Trainers because training N experts or chaining stages is not a single ``fit``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from jsonargparse import ActionConfigFile, ArgumentParser


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    function: str
    help: str


STAGES: dict[str, Stage] = {
    "experts": Stage("lightning_distill.stages.experts", "ExpertsConfig", "train_experts",
                     "train expert trajectories on real data into a trajectory store"),
    "distill": Stage("lightning_distill.stages.distill", "DistillConfig", "distill",
                     "distil a synthetic set by matching the experts' trajectories"),
    "evaluate": Stage("lightning_distill.stages.evaluate", "EvaluateConfig", "evaluate",
                      "train fresh networks on a synthetic set and report test accuracy"),
    "run": Stage("lightning_distill.stages.run", "RunConfig", "run",
                 "experts -> distill -> evaluate for one recipe, resuming what exists"),
}


def _load(stage: Stage):
    try:
        mod = importlib.import_module(stage.module)
    except ModuleNotFoundError as err:
        if err.name == stage.module:
            return None, None
        raise
    return getattr(mod, stage.config), getattr(mod, stage.function)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-distill",
        description="Dataset distillation by trajectory matching (MTT, FTD, DATM).",
        env_prefix="LIGHTNING_DISTILL",
        default_env=False,
    )
    subcommands = parser.add_subcommands(required=True, dest="stage")
    for name, stage in STAGES.items():
        sub = ArgumentParser(prog=f"lightning-distill {name}", description=stage.help,
                             print_config="--print_config")
        sub.add_argument("--config", action=ActionConfigFile,
                         help="YAML recipe; may be given several times")
        config_cls, _ = _load(stage)
        if config_cls is not None:
            sub.add_class_arguments(config_cls, nested_key=None, as_group=False)
        subcommands.add_subcommand(name, sub, help=stage.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    name = ns.stage
    stage = STAGES[name]
    config_cls, function = _load(stage)
    if config_cls is None:
        print(f"lightning-distill {name}: not yet available in this version", file=sys.stderr)
        return 2
    sub_ns = ns[name]
    sub_ns.pop("config", None)
    sub_parser = parser._subcommands_action._name_parser_map[name]
    instantiate = getattr(sub_parser, "instantiate", None) or sub_parser.instantiate_classes
    init = instantiate(sub_ns)
    cfg = config_cls(**{k: v for k, v in init.items() if k in config_cls.__dataclass_fields__})
    function(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
