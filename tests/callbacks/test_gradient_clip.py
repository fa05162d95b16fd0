"""AdaptiveGradientClip: the clip against hand-computed numbers, its warm-up, its resume,
and that it acts inside a manual-optimization step (the distillation module's)."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_distill.callbacks import AdaptiveGradientClip
from lightning_distill.callbacks.iteration_checkpoint import IterationCheckpoint
from lightning_distill.errors import InputError
from tests.helpers import (
    CrashAt,
    build_tiny_store,
    init_distill_module,
    make_distill_module,
    quiet_trainer,
)


def _param(grad):
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return p


def test_a_spike_is_clipped_to_factor_times_the_median_and_keeps_its_direction():
    clip = AdaptiveGradientClip(factor=2.0, history=3, warmup=2)
    for g in ([1.0, 0.0], [0.0, 1.0]):  # warm-up: recorded only
        assert clip.clip_([("x", _param(g))]) == 0
    p = _param([6.0, 8.0])  # norm 10 > 2 x median(1, 1) = 2
    assert clip.clip_([("x", p)]) == 1
    assert torch.allclose(p.grad, torch.tensor([1.2, 1.6]))  # norm 2, same direction
    p = _param([3.0, 0.0])  # median(1, 1, 10) = 1: limit 2, clipped to 2
    assert clip.clip_([("x", p)]) == 1
    assert torch.allclose(p.grad, torch.tensor([2.0, 0.0]))
    p = _param([2.5, 0.0])  # history (1, 10, 3): median 3, limit 6: untouched
    assert clip.clip_([("x", p)]) == 0
    assert torch.equal(p.grad, torch.tensor([2.5, 0.0]))
    assert list(clip.norms["x"]) == [10.0, 3.0, 2.5]  # norms before clipping
    assert clip.clipped == 2


def test_each_parameter_has_its_own_history_and_missing_gradients_are_skipped():
    clip = AdaptiveGradientClip(factor=2.0, history=4, warmup=1)
    clip.clip_([("big", _param([100.0])), ("small", _param([0.01]))])
    none = torch.nn.Parameter(torch.zeros(1))  # a skipped iteration: no gradient
    big, small = _param([150.0]), _param([1.0])
    assert clip.clip_([("big", big), ("small", small), ("none", none)]) == 1
    assert big.grad.item() == 150.0  # 1.5 medians of its own
    assert small.grad.item() == pytest.approx(0.02)  # 100 medians of its own: clipped
    assert "none" not in clip.norms


def test_the_history_resumes_from_the_state_dict():
    grads = [[1.0], [2.0], [1.5], [30.0], [1.0], [40.0]]
    whole = AdaptiveGradientClip(factor=3.0, history=3, warmup=2)
    first = [whole.clip_([("x", _param(g))]) for g in grads[:3]]
    resumed = AdaptiveGradientClip(factor=3.0, history=3, warmup=2)
    resumed.load_state_dict(whole.state_dict())
    rest = []
    for g in grads[3:]:
        a, b = _param(g), _param(g)
        rest.append((whole.clip_([("x", a)]), resumed.clip_([("x", b)])))
        assert torch.equal(a.grad, b.grad)
    assert first == [0, 0, 0] and [r[0] for r in rest] == [1, 0, 1]
    assert resumed.clipped == whole.clipped == 2


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"history": 0}, {"warmup": 0},
                                    {"history": 3, "warmup": 4}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(InputError, match="AdaptiveGradientClip"):
        AdaptiveGradientClip(**kwargs)


class _Manual(pl.LightningModule):
    """Manual optimization, as DistillationModule: plain SGD lr 1 on w, with the gradient
    of step k set to grads[k]."""

    def __init__(self, grads):
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.grads = grads

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        g = torch.tensor(self.grads[batch_idx])
        self.manual_backward((self.w * g).sum())
        opt.step()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(len(self.grads), 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_it_clips_inside_a_manual_optimization_step():
    grads = [[1.0, 0.0], [1.0, 0.0], [0.0, 30.0]]
    clip = AdaptiveGradientClip(factor=2.0, history=5, warmup=2)
    module = _Manual(grads)
    trainer = pl.Trainer(max_epochs=1, callbacks=[clip], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    # w = -(1, 0) - (1, 0) - (0, 30 clipped to 2 x median 1 = 2)
    assert torch.allclose(module.w.detach(), torch.tensor([-2.0, -2.0]))
    assert clip.clipped == 1 and list(clip.norms) == ["w"]


def test_in_a_distillation_it_clips_images_labels_and_step_size_and_resumes_exactly(tmp_path):
    """A low factor clips the real module's three parameters; 6 iterations straight equal
    3, a crash and a resume in a fresh module (the history comes from the checkpoint)."""
    store = tmp_path / "store"
    build_tiny_store(store, experts=2, epochs=4)

    def module():
        return make_distill_module(store, iterations=6, learn_labels=True)

    def clip():
        return AdaptiveGradientClip(factor=1.05, history=4, warmup=1)

    straight, c = init_distill_module(module()), clip()
    quiet_trainer(callbacks=[c]).fit(straight)
    assert set(c.norms) == {"images", "syn_lr", "labels"}
    assert c.clipped > 0
    unclipped = init_distill_module(module())
    quiet_trainer().fit(unclipped)
    assert not torch.equal(unclipped.images, straight.images)

    crashed, ckpt = init_distill_module(module()), IterationCheckpoint(tmp_path / "ckpt",
                                                                        every_n=3)
    with pytest.raises(KeyError, match="simulated crash"):
        quiet_trainer(callbacks=[clip(), ckpt, CrashAt(at=3)]).fit(crashed)
    resumed, c2 = module(), clip()
    quiet_trainer(callbacks=[c2]).fit(resumed, ckpt_path=str(ckpt.last))
    assert torch.equal(resumed.images, straight.images)
    assert torch.equal(resumed.labels, straight.labels)
    assert c2.clipped == c.clipped
