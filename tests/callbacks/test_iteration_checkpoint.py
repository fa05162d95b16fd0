"""IterationCheckpoint: last.ckpt every n iterations and at the end, renamed into place."""

from types import SimpleNamespace

import torch

from lightning_distill.callbacks import IterationCheckpoint


class _FakeTrainer:
    is_global_zero = True

    def __init__(self):
        self.saved = []
        self.strategy = SimpleNamespace(barrier=lambda name: None)

    def save_checkpoint(self, path, weights_only=False):
        self.saved.append(path.name)
        torch.save({"n": len(self.saved)}, path)


def test_saves_every_n_and_at_the_end(tmp_path):
    ckpt = IterationCheckpoint(tmp_path / "ckpt", every_n=2)
    trainer = _FakeTrainer()
    for it in range(1, 6):
        module = SimpleNamespace(iteration=torch.tensor(it))
        ckpt.on_train_batch_end(trainer, module, None, None, it - 1)
    assert len(trainer.saved) == 2  # iterations 2 and 4
    ckpt.on_train_end(trainer, None)
    assert trainer.saved == [".last.ckpt.tmp"] * 3
    assert ckpt.last == tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt.last, weights_only=True) == {"n": 3}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_old_import_path():
    from lightning_distill.stages.distill import IterationCheckpoint as old

    assert old is IterationCheckpoint
