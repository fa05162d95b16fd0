"""`lightning-distill distill` (stages/distill.py, through the CLI) on a tiny digits store:
outputs, skip of a finished run, exact resume of an interrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_distill.cli import main
from lightning_distill.data.synthetic import SyntheticSet
from tests.helpers import build_digits_store


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return build_digits_store(tmp_path_factory.mktemp("digits") / "experts")


def config(store: Path, out: Path, iterations: int = 4, resume: bool = True,
           callbacks: tuple[dict, ...] = (), **model) -> list[str]:
    """The ``distill`` command line of a tiny digits run into ``out`` (its recipe written
    beside ``out``): ipc 1, learned labels, a sequential window, EMA, a checkpoint and
    image grids every 2 iterations; ``model`` overrides the module's arguments."""
    m = {"store": str(store), "ipc": 1, "iterations": iterations, "syn_steps": 3,
         "max_start_epoch": 2, "lr_img": 10.0, "lr_lr": 1e-4, "learn_labels": True, "seed": 3,
         **model}
    recipe = {
        "output": str(out), "resume": resume, "model": m, "data": {"name": "digits"},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "callbacks": [
            {"class_path": "lightning_distill.callbacks.MatchingWindow",
             "init_args": {"min_start_epoch": 0, "current_max_start_epoch": 1,
                           "max_start_epoch": 2, "expansion_end": 2, "sequential": True}},
            {"class_path": "lightning_distill.callbacks.SyntheticEMA",
             "init_args": {"decay": 0.9}},
            {"class_path": "lightning_distill.callbacks.IterationCheckpoint",
             "init_args": {"every_n": 2}},
            {"class_path": "lightning_distill.callbacks.SyntheticImageLogger",
             "init_args": {"every_n_steps": 2}},
            *callbacks]}}
    path = Path(f"{out}_{iterations}_{int(resume)}_{len(callbacks)}.yaml")
    path.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    return ["distill", "--config", str(path)]


def distill(argv: list[str]) -> Path:
    """Run the command line; the set's path."""
    assert main(argv) == 0
    return Path(json.loads(Path(argv[-1]).read_text(encoding="utf-8"))["output"]) / "synthetic.pt"


def test_distill_stage_writes_set_checkpoint_and_image_grids(digits_store, tmp_path):
    out = tmp_path / "run"
    path = distill(config(digits_store, out))
    assert path == out / "synthetic.pt"
    syn = SyntheticSet.load(path)
    assert syn.images.shape == (10, 1, 8, 8) and syn.labels.shape == (10, 10)
    assert syn.meta["iteration"] == 4 and syn.meta["dataset"] == "digits"
    assert (out / "synthetic.png").exists() and (out / "synthetic_ema.pt").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 4
    assert torch.equal(ckpt["state_dict"]["images"], syn.images)
    assert "distill_generator_states" in ckpt
    acc = EventAccumulator(str(out / "logs"), size_guidance={"images": 0}).Reload()
    assert {"synthetic/images", "synthetic/ema_images"} <= set(acc.Tags()["images"])
    grid = acc.Images("synthetic/images")[-1]
    # a row per class, each 8x8 image enlarged to 64x64 (GRID_MIN_IMAGE_SIDE), 1 px apart
    assert (grid.height, grid.width) == (10 * 65 + 1, 1 * 65 + 1)
    for tag in ("distill/loss", "distill/syn_lr", "distill/window/upper_bound",
                "distill/start_epoch", "distill/skipped", "distill/grad_norm/labels"):
        assert tag in acc.Tags()["scalars"], tag
    assert [e.value for e in acc.Scalars("distill/window/upper_bound")] == [1, 1, 2, 2]

    # a rerun finds the finished set and does nothing
    mtime = path.stat().st_mtime_ns
    assert distill(config(digits_store, out)) == path
    assert path.stat().st_mtime_ns == mtime


class _Crash(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.iteration) == 2:
            raise KeyError("simulated crash")


def test_interrupted_run_resumes_exactly(digits_store, tmp_path):
    straight = SyntheticSet.load(distill(config(digits_store, tmp_path / "a")))
    crash = {"class_path": f"{__name__}._Crash"}
    with pytest.raises(KeyError, match="simulated crash"):
        distill(config(digits_store, tmp_path / "b", callbacks=(crash,)))
    half = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(half["state_dict"]["iteration"]) == 2
    assert SyntheticSet.load(tmp_path / "b" / "synthetic.pt").meta["iteration"] == 2
    resumed = SyntheticSet.load(distill(config(digits_store, tmp_path / "b")))
    assert resumed.meta["iteration"] == 4
    assert torch.equal(resumed.images, straight.images)
    assert torch.equal(resumed.labels, straight.labels)
    assert resumed.lr == straight.lr
    ema_a = SyntheticSet.load(tmp_path / "a" / "synthetic_ema.pt")
    ema_b = SyntheticSet.load(tmp_path / "b" / "synthetic_ema.pt")
    assert torch.equal(ema_a.images, ema_b.images)
    # resume=False starts over (and gets the same result: everything is seeded)
    again = SyntheticSet.load(distill(config(digits_store, tmp_path / "b", resume=False)))
    assert torch.equal(again.images, straight.images)


def test_finished_run_is_extended_and_lost_set_rewritten(digits_store, tmp_path):
    out = tmp_path / "run"
    four = SyntheticSet.load(distill(config(digits_store, out)))
    # synthetic.pt lost after a finished run: the rerun restores it from the checkpoint
    (out / "synthetic.pt").unlink()
    again = SyntheticSet.load(distill(config(digits_store, out)))
    assert again.meta["iteration"] == 4 and torch.equal(again.images, four.images)
    # asking for more iterations continues the finished run: 4 + 2 equals 6 in one go
    six = SyntheticSet.load(distill(config(digits_store, out, iterations=6)))
    straight = SyntheticSet.load(distill(config(digits_store, tmp_path / "s6", iterations=6)))
    assert six.meta["iteration"] == straight.meta["iteration"] == 6
    assert torch.equal(six.images, straight.images) and torch.equal(six.labels, straight.labels)


def test_distill_stage_with_pad_and_att_options(digits_store, tmp_path):
    """The recipe keys reach the module: the PAD mask (by name) and ATT's matched step,
    logged every iteration within 1..syn_steps."""
    out = tmp_path / "opts"
    distill(config(digits_store, out, match="closest", param_mask=["classifier"]))
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    hp = saved["hyper_parameters"]
    assert (hp["match"], hp["param_mask"]) == ("closest", ["classifier"])
    assert "param_mask" not in saved["state_dict"]  # rebuilt from the hyperparameters
    acc = EventAccumulator(str(out / "logs")).Reload()
    steps = [e.value for e in acc.Scalars("distill/matched_step")]
    assert len(steps) == 4 and all(1 <= s <= 3 for s in steps)  # syn_steps 3
