"""Two-process CPU DDP run of DistillationModule, launched by tests/modules/test_distill.py.

Usage: ``python tests/modules/ddp_distill_script.py STORE OUTDIR``. Lightning's subprocess
launcher re-runs this script once per extra rank (hence the ``__main__`` guard). Each rank
saves its initial and final images, labels and syn_lr to ``OUTDIR/rank{r}.pt``; the run
ends with a checkpoint ``OUTDIR/last.ckpt``. Rank 1's loss is NaN at iteration
``NAN_ITERATION``, so that iteration steps with rank 0's gradient alone. A
``PeriodicEvaluation`` (``make_evaluation``) evaluates after iteration 2 and at the end,
its runs shared out over the two ranks; each rank saves its history and final synthetic
set. The test imports ``make_module`` / ``make_window`` / ``make_evaluation`` for its
single-process replay.
"""

from __future__ import annotations

import os
import sys

import torch

ITERATIONS = 3
NAN_ITERATION = 1
SEED = 11
WORLD_SIZE = 2


def make_module(store: str):
    from lightning_distill.modules.distill import DistillationModule

    return DistillationModule(store, 2, iterations=ITERATIONS, syn_steps=3, expert_epochs=2,
                              max_start_epoch=3, batch_syn=4, lr_img=10.0, lr_lr=1e-3,
                              lr_y=2.0, lr_teacher=0.05, learn_labels=True, dsa=True,
                              dsa_flip=False, seed=SEED)


def make_window():
    from lightning_distill.callbacks.matching_window import MatchingWindow

    return MatchingWindow(0, 1, 3, 1, sequential=True)


def make_evaluation(best_path=None):
    from lightning_distill.callbacks.evaluation import PeriodicEvaluation
    from tests.helpers import tiny_data

    vx, vy = tiny_data(per_class=4, seed=5)
    return PeriodicEvaluation(vx, vy, every_n_steps=2, runs=3, model_kwargs={"width": 4,
                              "depth": 2}, epochs=4, batch_size=4, seed=3, evaluate_ema=False,
                              best_path=best_path)


def main(store: str, outdir: str) -> None:
    import pytorch_lightning as pl

    from tests.helpers import tiny_data

    module = make_module(store)
    original = module.matching_loss

    def loss_nan_on_rank1(it):
        loss, info = original(it)
        if module.global_rank == 1 and it == NAN_ITERATION:
            loss = loss * float("nan")
        return loss, info

    module.matching_loss = loss_nan_on_rank1
    x, y = tiny_data()
    module.initialize(train_images=x, train_labels=y)
    init = {f"init_{k}": getattr(module, k).detach().clone() for k in ("images", "labels",
                                                                         "syn_lr")}
    evaluation = make_evaluation(os.path.join(outdir, "best.pt"))
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=WORLD_SIZE, max_epochs=1,
                         callbacks=[make_window(), evaluation], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module)
    trainer.save_checkpoint(os.path.join(outdir, "last.ckpt"))
    torch.save({**init, "images": module.images.detach().clone(),
                "labels": module.labels.detach().clone(),
                "syn_lr": module.syn_lr.detach().clone(), "iteration": int(module.iteration),
                "skipped": int(module.skipped), "streak": int(module.nonfinite_streak),
                "world_size": trainer.world_size, "history": evaluation.history,
                "synthetic": module.synthetic_set().to("cpu").to_dict()},
               os.path.join(outdir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
