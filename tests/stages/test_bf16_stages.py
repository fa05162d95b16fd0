"""Every stage under ``precision="bf16-mixed"`` on the CPU (docs/method.md, 'Mixed
precision'): GSAM experts, a distillation in each gradient mode, the evaluation single
and grouped; the store and the synthetic set are float32; the distillation refuses
``16-mixed``."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_distill.data.synthetic import SyntheticSet
from lightning_distill.errors import ConfigError
from lightning_distill.functional.evaluation import EvalProtocol
from lightning_distill.trajectories import TrajectoryStore

from .test_evaluate_run_stages import _run_recipe


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The tiny run recipe of test_evaluate_run_stages with bf16-mixed for every stage,
    a distillation per gradient mode and the evaluation in groups of 2 and of 1."""
    from lightning_distill import cli

    tmp = tmp_path_factory.mktemp("bf16")
    recipe = _run_recipe(tmp / "work")
    recipe["trainer"]["precision"] = "bf16-mixed"
    base = recipe["distill"][0]
    recipe["distill"] = [{**base, "name": mode, "model": {**base["model"], "mode": mode}}
                         for mode in ("full", "recompute", "tesla")]
    recipe["evaluate"].update(runs=2, model={"protocol": {"epochs": 3, "group_size": 2}})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert cli.main(["run", "--config", str(path)]) == 0
    return tmp / "work"


def test_store_and_sets_are_float32(bf16_run):
    store = TrajectoryStore.open(bf16_run / "experts")
    for i in (0, 1):
        snapshots = torch.load(store.expert_path(i), weights_only=True)
        tensors = [t for t in _tensors(snapshots) if t.is_floating_point()]
        assert tensors and {t.dtype for t in tensors} == {torch.float32}
    for mode in ("full", "recompute", "tesla"):
        syn = SyntheticSet.load(bf16_run / mode / "synthetic.pt")
        assert syn.meta["iteration"] == 3
        assert syn.images.dtype == torch.float32 and torch.isfinite(syn.images).all()
        assert syn.labels.dtype in (torch.float32, torch.int64)
        assert float(syn.lr) > 0


def test_evaluation_ran_in_bf16_grouped(bf16_run):
    results = json.loads((bf16_run / "results.json").read_text())
    assert results["config"]["protocol"]["precision"] == "bf16-mixed"
    for row in results["rows"]:
        accs = row["results"]["ConvNet"]["accs"]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("group_size", [1, 2])
def test_protocol_precision_runs_the_loops_under_autocast(group_size):
    """bf16-mixed changes the runs' numbers (autocast is on), single and grouped, and a
    Trainer's precision reaches a protocol that leaves it unset."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 4, (20,), generator=g)
    tx, ty = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        protocol = EvalProtocol(epochs=3, batch_size=8, group_size=group_size, dsa=False,
                                precision=precision)
        out[precision] = protocol.train_runs_results(
            "ConvNet", {"width": 8, "depth": 2}, [0, 1], x, y, set_lr=0.05, num_classes=4,
            test_images=tx, test_labels=ty)
    for a, b in zip(out["32-true"], out["bf16-mixed"], strict=True):
        assert a["train_loss"] != b["train_loss"]
        assert abs(a["train_loss"] - b["train_loss"]) < 0.25 * abs(a["train_loss"])
    assert EvalProtocol().for_trainer("bf16-mixed").precision == "bf16-mixed"
    assert EvalProtocol().for_trainer("64-true").precision == "32-true"
    assert EvalProtocol(precision="32-true").for_trainer("bf16-mixed").precision == "32-true"
    with pytest.raises(ValueError, match="precision must be one of"):
        EvalProtocol(precision="bf16")


def test_distillation_refuses_16_mixed(bf16_run):
    from pytorch_lightning.plugins.precision import MixedPrecision

    from lightning_distill import DistillationModule

    module = DistillationModule(str(bf16_run / "experts"), ipc=1, iterations=1,
                                max_start_epoch=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False,
                         plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ConfigError, match="trainer.precision.*16-mixed.*bf16-mixed"):
        trainer.fit(module)
