"""The modules in a user's own Lightning project (issue 28): each of the three public
modules in a plain ``pl.Trainer`` under TensorBoard, CSV and no logger, and under a stock
``LightningCLI(Module, DataModule)`` with a logger; distillation steps that are
iterations everywhere a user sees a step; optimizer overrides refused; the warning of an
oversubscribed CPU run; grids a person can see."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_distill import (
    DistillationModule,
    EvalModule,
    ExpertTrajectoryModule,
    LightningDistillError,
    RealDataModule,
    SyntheticDataModule,
)
from lightning_distill.callbacks import (
    IterationProgressBar,
    MatchingWindow,
    PeriodicEvaluation,
    SyntheticImageLogger,
    TrajectoryRecorder,
)
from lightning_distill.data.synthetic import class_grid, upscale_factor
from lightning_distill.modules._build import warn_oversubscribed
from tests.helpers import build_digits_store, random_digits_set

ITERATIONS = 4

#: the metrics each module documents (docs/formats.md, 'Logged metrics'), a subset
DOCUMENTED = {
    "experts": {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc"},
    "distill": {"distill/loss", "distill/syn_lr", "distill/skipped"},
    "evaluate": {"train/loss", "val/acc", "test/acc"},
}


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return build_digits_store(tmp_path_factory.mktemp("digits") / "experts")


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("set") / "random.pt"
    random_digits_set(ipc=2).save(path, grid=False)
    return path


def _distill_module(store: Path, **kw) -> DistillationModule:
    args = dict(ipc=1, iterations=ITERATIONS, syn_steps=2, max_start_epoch=2, lr_img=10,
                lr_lr=1e-4, learn_labels=True, label_init="soft", seed=3)
    return DistillationModule(str(store), **{**args, **kw})


def _fit(kind: str, logger, tmp_path: Path, digits_store: Path, digits_set: Path):
    """Train one tiny run of ``kind`` in a plain Trainer; returns the trainer and the
    names of the metrics its callbacks saw (``callback_metrics`` after fit and test)."""
    common = dict(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False,
                  log_every_n_steps=1, default_root_dir=str(tmp_path))
    if kind == "experts":
        module = ExpertTrajectoryModule("ConvNet", model_kwargs={"width": 8, "depth": 2},
                                        lr=0.05)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                             callbacks=[TrajectoryRecorder(str(tmp_path / "store"))], **common)
        trainer.fit(module, datamodule=RealDataModule("digits", batch_size=64))
    elif kind == "distill":
        module = _distill_module(digits_store)
        trainer = pl.Trainer(max_epochs=-1, callbacks=[MatchingWindow(0, 1, 2)], **common)
        trainer.fit(module, datamodule=RealDataModule("digits", batch_size=64))
    else:
        module = EvalModule(model_kwargs={"width": 8, "depth": 2}, epochs=2, seed=0)
        data = SyntheticDataModule(str(digits_set))
        trainer = pl.Trainer(max_epochs=2, **common)
        trainer.fit(module, datamodule=data)
        fitted = set(trainer.callback_metrics)
        trainer.test(module, datamodule=data)
        assert module.test_accuracy is not None and 0.0 <= module.test_accuracy <= 1.0
        return trainer, fitted | set(trainer.callback_metrics)
    return trainer, set(trainer.callback_metrics)


def _csv_names(logger: CSVLogger) -> set[str]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return set(next(csv.reader(f))) - {"step", "epoch"}


def _tb_names(logger: TensorBoardLogger) -> set[str]:
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("kind", ["experts", "distill", "evaluate"])
@pytest.mark.parametrize("logger_kind", ["tensorboard", "csv", "none"])
def test_each_module_under_each_logger(kind, logger_kind, tmp_path, digits_store, digits_set):
    logger = {"tensorboard": lambda: TensorBoardLogger(str(tmp_path), name="tb"),
              "csv": lambda: CSVLogger(str(tmp_path), name="csv"),
              "none": lambda: False}[logger_kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, seen = _fit(kind, logger, tmp_path, digits_store, digits_set)
    if logger_kind == "csv":
        names = _csv_names(logger)
    elif logger_kind == "tensorboard":
        names = _tb_names(logger)
    else:  # no logger: the metrics still reach callbacks (ModelCheckpoint, EarlyStopping)
        names = seen
    missing = DOCUMENTED[kind] - names
    assert not missing, f"{kind} under {logger_kind}: {sorted(missing)} not logged"
    if logger_kind == "csv" and kind == "evaluate":
        # the module's and the datamodule's hyperparameters merged without a clash
        hp = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert hp["protocol"]["epochs"] == 2 and hp["batch_size"] == 1024


def test_eval_module_hparams_do_not_clash_with_the_datamodule(digits_set):
    module = EvalModule(epochs=7, batch_size=16)
    data = SyntheticDataModule(str(digits_set))
    assert module.epochs == 7 and module.hparams["protocol"]["batch_size"] == 16
    assert "batch_size" not in module.hparams and data.hparams["batch_size"] == 1024


def _stock_cli_args(kind: str, tmp_path: Path, store: Path, digits_set: Path) -> list[str]:
    common = ["--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.enable_checkpointing=false", "--trainer.log_every_n_steps=1",
              f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
              f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=cli"]
    if kind == "experts":
        return ["fit", "--model.model_kwargs={width: 8, depth: 2}", "--model.lr=0.05",
                "--data.name=digits", "--data.batch_size=64", "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                '--trainer.callbacks+={"class_path": '
                '"lightning_distill.callbacks.TrajectoryRecorder", "init_args": '
                f'{{"store": "{tmp_path / "store"}"}}}}', *common]
    if kind == "distill":
        return ["fit", f"--model.store={store}", "--model.ipc=1",
                f"--model.iterations={ITERATIONS}", "--model.syn_steps=2",
                "--model.max_start_epoch=2", "--model.lr_img=10", "--data.name=digits",
                "--trainer.max_epochs=-1", *common]
    return ["fit", "--model.epochs=2", "--model.model_kwargs={width: 8, depth: 2}",
            f"--data.synthetic={digits_set}", "--trainer.max_epochs=2", *common]


@pytest.mark.parametrize("kind,classes", [
    ("experts", (ExpertTrajectoryModule, RealDataModule)),
    ("distill", (DistillationModule, RealDataModule)),
    ("evaluate", (EvalModule, SyntheticDataModule)),
])
def test_each_module_under_a_stock_lightning_cli_with_a_logger(kind, classes, tmp_path,
                                                               digits_store, digits_set):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(*classes, args=_stock_cli_args(kind, tmp_path, digits_store,
                                                          digits_set))
    names = _csv_names(cli.trainer.logger)
    assert not DOCUMENTED[kind] - {"test/acc"} - names
    if kind == "evaluate":  # and it tests
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        assert cli.model.test_accuracy is not None


def test_distillation_steps_are_iterations(tmp_path, digits_store):
    """After N iterations: a stock ModelCheckpoint's file says step=N; per-iteration
    metrics are logged at steps 0..N-1; the evaluation and the image grid of the set
    after N iterations sit at step N-1, the iteration that made it."""
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    module = _distill_module(digits_store, threshold=1e-9)  # some iterations skip
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))
    evaluation = PeriodicEvaluation(every_n_steps=ITERATIONS, runs=1, epochs=2,
                                    model_kwargs={"width": 8, "depth": 2})
    trainer = pl.Trainer(max_epochs=-1, accelerator="cpu", logger=[csv_logger, tb_logger],
                         callbacks=[MatchingWindow(0, 1, 2), checkpoint, evaluation,
                                    SyntheticImageLogger(every_n_steps=ITERATIONS)],
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=RealDataModule("digits", batch_size=64))
    assert int(module.skipped) > 0  # skipped iterations count as steps too
    assert trainer.global_step == ITERATIONS
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [
        f"epoch=0-step={ITERATIONS}.ckpt"]
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss_steps = [int(r["step"]) for r in rows if r.get("distill/loss")]
    assert loss_steps == list(range(ITERATIONS))
    assert [int(r["step"]) for r in rows if r.get("val/acc_mean")] == [ITERATIONS - 1]
    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("synthetic/images")] == [ITERATIONS - 1]


def test_an_older_checkpoint_with_one_optimizer_per_tensor_resumes():
    """Checkpoints written before the single optimizer held one SGD state per tensor:
    on load they become the groups of today's optimizer, states and settings kept."""
    module = DistillationModule.__new__(DistillationModule)
    buf = [torch.full((2,), float(k)) for k in range(3)]
    old = [{"state": {0: {"momentum_buffer": buf[k]}},
            "param_groups": [{"lr": lr, "momentum": m, "params": [0]}]}
           for k, (lr, m) in enumerate([(10.0, 0.5), (1e-4, 0.5), (2.0, 0.9)])]
    checkpoint = {"optimizer_states": old}
    DistillationModule.on_load_checkpoint(module, checkpoint)
    (new,) = checkpoint["optimizer_states"]
    assert [g["params"] for g in new["param_groups"]] == [[0], [1], [2]]
    assert [(g["lr"], g["momentum"]) for g in new["param_groups"]] == [
        (10.0, 0.5), (1e-4, 0.5), (2.0, 0.9)]
    assert all(torch.equal(new["state"][k]["momentum_buffer"], buf[k]) for k in range(3))


def test_one_optimizer_steps_as_one_sgd_per_tensor():
    """The grouped optimizer's update equals one SGD per tensor, by hand."""
    torch.manual_seed(0)
    x, lr_param, y = (torch.randn(3, requires_grad=True) for _ in range(3))
    ref = [t.detach().clone().requires_grad_() for t in (x, lr_param, y)]
    settings = [(10.0, 0.5), (1e-4, 0.5), (2.0, 0.9)]
    grouped = torch.optim.SGD([{"params": [t], "lr": lr, "momentum": m}
                               for t, (lr, m) in zip((x, lr_param, y), settings, strict=True)])
    single = [torch.optim.SGD([t], lr=lr, momentum=m)
              for t, (lr, m) in zip(ref, settings, strict=True)]
    for _ in range(3):
        g = [torch.randn(3) for _ in range(3)]
        for t, r, gk in zip((x, lr_param, y), ref, g, strict=True):
            t.grad, r.grad = gk.clone(), gk.clone()
        grouped.step()
        for opt in single:
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip((x, lr_param, y), ref, strict=True))


@pytest.mark.parametrize("module_kind", ["experts", "distill", "evaluate"])
def test_an_optimizer_set_by_lightning_cli_is_refused(module_kind, tmp_path, digits_store,
                                                      digits_set):
    classes = {"experts": (ExpertTrajectoryModule, RealDataModule),
               "distill": (DistillationModule, RealDataModule),
               "evaluate": (EvalModule, SyntheticDataModule)}[module_kind]
    args = _stock_cli_args(module_kind, tmp_path, digits_store, digits_set)
    # the networks built at construction (LightningCLI builds its optimizer from the
    # module's parameters before the fit; a network built later has none yet)
    args += {"experts": ["--model.channels=1", "--model.num_classes=10",
                         "--model.image_size=8"],
             "distill": [], "evaluate": [f"--model.synthetic={digits_set}"]}[module_kind]
    with pytest.raises(LightningDistillError, match="optimizer is part of the method"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LightningCLI(*classes, args=[*args, "--optimizer=Adam"])


def test_lightning_distill_refuses_an_optimizer_in_one_line(capsys):
    from lightning_distill import cli

    assert cli.main(["distill", "--config", "digits/ipc10", "--optimizer", "Adam"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--optimizer" in err[0] and "own SGD" in err[0]


def test_a_cpu_run_with_more_processes_than_cores_warns(monkeypatch):
    import os

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(type(trainer), "num_devices", property(lambda self: 3))
    with pytest.warns(UserWarning, match="3 processes per machine .* 1 cores"):
        warn_oversubscribed(trainer)
    monkeypatch.setattr(type(trainer), "num_devices", property(lambda self: 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_oversubscribed(trainer)


def test_grids_enlarge_each_image_by_nearest_neighbour():
    assert upscale_factor((8, 8), 64) == 8 and upscale_factor((28, 28), 64) == 3
    assert upscale_factor((64, 64), 64) == 1 and upscale_factor((32, 20), 64) == 4
    images = torch.rand(4, 1, 8, 8)
    ids = torch.tensor([0, 0, 1, 1])
    big = class_grid(images, ids, lambda x: x, padding=0, min_image_side=64)
    assert big.shape == (3, 2 * 64, 2 * 64)
    # every source pixel is an 8 x 8 block of the same value
    assert torch.equal(big[0, :64, :64], images[0, 0].repeat_interleave(8, 0)
                       .repeat_interleave(8, 1))
    small = class_grid(images, ids, lambda x: x, padding=0)
    assert small.shape == (3, 16, 16)


def test_the_distill_subcommand_shows_iterations_in_its_progress_bar(tmp_path):
    from jsonargparse import Namespace

    from lightning_distill.stages.distill import fill_distill_outputs

    cfg = Namespace(output=str(tmp_path), model=Namespace(export_path=None),
                    trainer=Namespace(callbacks=None, logger=None, default_root_dir=None,
                                      enable_progress_bar=True))
    fill_distill_outputs(cfg)
    paths = [c.class_path for c in cfg.trainer.callbacks]
    assert "lightning_distill.callbacks.IterationProgressBar" in paths
    assert issubclass(IterationProgressBar, pl.callbacks.RichProgressBar)


def test_store_written_by_the_recorder_records_its_hparams_in_one_layout(tmp_path):
    module = ExpertTrajectoryModule("ConvNet", model_kwargs={"width": 8, "depth": 2}, lr=0.05)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False,
                         callbacks=[TrajectoryRecorder(str(tmp_path / "store"))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=RealDataModule("digits", batch_size=64))
    hp = json.loads((tmp_path / "store" / "meta.json").read_text())["hparams"]
    assert set(hp) == {"module", "epochs", "batch_size", "sharpness"}
    assert hp["module"]["lr"] == 0.05 and hp["sharpness"] == {"method": "none"}


#: the keys of a packaged recipe that belong to lightning-distill, not to a stock
#: LightningCLI (docs/recipes.md, 'Which keys are the library CLI's own')
LIBRARY_KEYS = {"distill": ("output", "resume")}


def test_a_packaged_recipe_runs_under_a_stock_lightning_cli(tmp_path, digits_store):
    """docs/recipes.md: a recipe's model / data / trainer under a user's own
    ``LightningCLI(DistillationModule, RealDataModule)``: drop the library's keys, give
    the paths that ``output`` filled in (the set, the checkpoints), and fit."""
    from lightning_distill.stages.recipes import resolve_config

    recipe = yaml.safe_load(Path(resolve_config("digits/ipc10")).read_text())
    for key in LIBRARY_KEYS["distill"]:
        recipe.pop(key, None)
    recipe["model"].update(store=str(digits_store), export_path=str(tmp_path / "set.pt"))
    for cb in recipe["trainer"]["callbacks"]:  # the tiny store has 3 epochs
        if cb["class_path"].endswith("MatchingWindow"):
            cb["init_args"]["max_start_epoch"] = 1
        if cb["class_path"].endswith("IterationCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
        if cb["class_path"].endswith("PeriodicEvaluation"):
            cb["init_args"]["protocol"]["epochs"] = 2
    config = tmp_path / "ipc10.yaml"
    config.write_text(yaml.safe_dump(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(DistillationModule, RealDataModule, args=[
            "fit", "--config", str(config), "--model.iterations=2", "--model.syn_steps=2",
            "--model.max_start_epoch=1", "--model.ipc=1", "--model.batch_syn=10",
            "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert (tmp_path / "set.pt").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
