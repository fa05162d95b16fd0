"""DistillationModule under a user's own stock ``LightningCLI(DistillationModule,
RealDataModule)``: public Lightning API only, metrics to any logger, stock callbacks
monitoring them, a run stopped by ``--trainer.max_time`` resumed exactly."""

from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningCLI

from lightning_distill import DistillationModule, RealDataModule
from lightning_distill.data.synthetic import SyntheticSet
from tests.helpers import build_digits_store

ITERATIONS = 4


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return build_digits_store(tmp_path_factory.mktemp("digits") / "experts")


class SlowIterations(Callback):
    """Makes every iteration last at least a second (a time budget then stops a run
    part-way whatever the machine's speed)."""

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(1.0)


def _cb(class_path: str, **init_args) -> str:
    return json.dumps({"class_path": class_path, "init_args": init_args})


def cli_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--model.store={store}", "--model.ipc=1", f"--model.iterations={ITERATIONS}",
        "--model.syn_steps=3", "--model.max_start_epoch=2", "--model.lr_img=10",
        "--model.lr_lr=1e-4", "--model.learn_labels=true", "--model.seed=3",
        f"--model.export_path={out / 'synthetic.pt'}",
        "--data.name=digits",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=-1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=" + _cb("lightning_distill.callbacks.MatchingWindow",
                                      min_start_epoch=0, current_max_start_epoch=1,
                                      max_start_epoch=2, expansion_end=2, sequential=True),
        "--trainer.callbacks+=" + _cb("lightning_distill.callbacks.IterationCheckpoint",
                                      dirpath=str(out / "checkpoints"), every_n=2),
        *extra,
    ]


def run_cli(args: list[str]) -> LightningCLI:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LightningCLI(DistillationModule, RealDataModule, args=args,
                            save_config_kwargs={"overwrite": True})


def test_stock_cli_fit_logs_every_iteration_to_csv_and_checkpoints_by_the_loss(
        digits_store, tmp_path):
    out = tmp_path / "run"
    logger = _cb("pytorch_lightning.loggers.CSVLogger", save_dir=str(out), name="csv",
                 version="")
    best = _cb("pytorch_lightning.callbacks.ModelCheckpoint", dirpath=str(out / "best"),
               monitor="distill/loss", mode="min", save_top_k=1, every_n_train_steps=1,
               filename="best")
    cli = run_cli(cli_args(digits_store, out, f"--trainer.logger={logger}",
                           f"--trainer.callbacks+={best}"))
    module = cli.model
    assert int(module.iteration) == ITERATIONS
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["distill/loss"]) for r in rows if r.get("distill/loss")}
    lrs = {int(r["step"]): float(r["distill/syn_lr"]) for r in rows if r.get("distill/syn_lr")}
    assert sorted(losses) == list(range(ITERATIONS)) == sorted(lrs)
    assert all(v > 0 for v in losses.values())
    # the last iteration's syn_lr is the value before its step; the set holds the one after
    assert lrs[ITERATIONS - 1] > 0
    assert "distill/loss" in cli.trainer.callback_metrics
    assert (out / "best" / "best.ckpt").is_file()  # the stock callback monitored the loss
    # Lightning's own config.yaml of the run, and the module's own export
    assert (out / "csv" / "config.yaml").is_file()
    assert SyntheticSet.load(out / "synthetic.pt").meta["iteration"] == ITERATIONS


def test_max_time_stop_and_rerun_equals_an_uninterrupted_run(digits_store, tmp_path):
    straight = run_cli(cli_args(digits_store, tmp_path / "a", "--trainer.logger=false"))
    whole = SyntheticSet.load(tmp_path / "a" / "synthetic.pt")
    assert whole.meta["iteration"] == ITERATIONS
    out = tmp_path / "b"
    # iterations of at least a second against a two-second budget: Lightning's Timer
    # stops the run after its second or third iteration
    stopped = run_cli(cli_args(digits_store, out, "--trainer.logger=false",
                               "--trainer.max_time=00:00:00:02",
                               "--trainer.callbacks+=tests.test_stock_cli_distill.SlowIterations"))
    done = int(stopped.model.iteration)
    assert 0 < done < ITERATIONS
    ckpt = out / "checkpoints" / "last.ckpt"
    assert int(torch.load(ckpt, weights_only=True)["state_dict"]["iteration"]) == done
    resumed = run_cli(cli_args(digits_store, out, "--trainer.logger=false",
                               f"--ckpt_path={ckpt}"))
    assert int(resumed.model.iteration) == ITERATIONS
    again = SyntheticSet.load(out / "synthetic.pt")
    assert torch.equal(again.images, whole.images)
    assert torch.equal(again.labels, whole.labels)
    assert again.lr == whole.lr
    del straight
