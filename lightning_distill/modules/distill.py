"""DistillationModule: one outer trajectory-matching iteration per training step.

MTT (Cazenavette et al., CVPR 2022), FTD (Du et al., CVPR 2023) and DATM (Guo et al., ICLR
2024); docs/method.md, sections 'Matching loss' to 'EMA of the synthetic images'; PAD's
parameter selection and ATT's closest step as options ('Beyond DATM'). The module's
parameters are the synthetic pixels X [N, C, H, W] (N = classes * ipc), the labels
(learnable logits Y [N, K] for DATM soft labels, else a fixed buffer) and the student
step size syn_lr. Each step:

1. sample an expert and a start epoch t (the :class:`MatchingWindow`, 'Matching window');
2. unroll a student from snapshot t for ``syn_steps`` steps on minibatches of the
   synthetic set (DSA on each) and compute
   ||theta_N - theta_{t+M}||^2 / ||theta_t - theta_{t+M}||^2 with
   :func:`~lightning_distill.functional.trajectory_matching_loss` (full, recompute or
   tesla mode);
3. skip the iteration if the loss is above ``threshold`` (DATM) or not finite;
   otherwise step SGD on X (lr_img, momentum 0.5), syn_lr (lr_lr, 0.5) and Y (lr_y, 0.9)
   (one optimizer, one step per iteration).

Guards: a non-finite loss or gradient skips the iteration and is counted;
``max_nonfinite`` consecutive iterations without a step and with a non-finite loss (on
any rank) or gradient stop training with an error (on every rank at once). After each
step syn_lr is clamped to [syn_lr_min, syn_lr_max] (a non-positive step size would make the
student climb the loss; an exploding one diverges): each clamp is counted and logged.

Multi-GPU (DDP): every rank samples its own expert, start epoch, minibatches and DSA
draws (its generator is seeded from (seed, rank)), all ranks run one backward and
DDP averages the gradients, so G GPUs match G trajectories per iteration. A rank
whose loss is skipped contributes a zero gradient and the average is rescaled to the
ranks that contributed; the iteration is skipped only when none did (or when a
gradient is non-finite: the all-reduce carries it to every rank).

Example::

    module = DistillationModule("outputs/cifar10/experts", ipc=10, syn_steps=80,
                                expert_epochs=2, max_start_epoch=20, lr_img=100)
    trainer = pl.Trainer(max_epochs=-1, callbacks=[MatchingWindow(0, 10, 20, 1000, True)])
    trainer.fit(module, datamodule=RealDataModule("cifar10", zca=True))

The datamodule supplies real data only (the initialisation from its training part,
the validation split for PeriodicEvaluation): the training "batches" are this
module's outer iterations (``owns_train_loader``; RealDataModule serves them). Without a
datamodule, call ``module.initialize(datamodule)`` (or pass tensors) before ``fit``.
Training stops by itself after ``iterations`` whatever ``max_epochs`` says; with
``max_epochs=-1`` a run stopped early (``max_time``, a signal, a crash) and resumed
from its checkpoint goes on to ``iterations``, and a finished run resumed with a larger
``iterations`` continues. Metrics (``self.log``, so every logger and
ModelCheckpoint / EarlyStopping see them) are ``distill/<name>``: docs/formats.md,
'Logged metrics'.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.func import functional_call

from .._version import __version__
from ..data.augment import DEFAULT_DSA_STRATEGY, DSA, dsa_flip_for
from ..data.input_space import InputSpace
from ..data.splits import images_view, split_labels
from ..errors import ConfigError, InputError, InputTypeError, StateError
from ..functional.initialization import (
    class_permutations,
    correct_sample_indices,
    soft_label_logits,
)
from ..functional.matching import (
    MATCH_RULES,
    MATCHING_MODES,
    parameter_mask,
    sample_minibatches,
    trajectory_matching,
)
from ..protocols import DefersTrainLoader
from ..seeding import derive_seed
from ..trajectories import TrajectoryStore
from ._build import check_fit

IMAGE_INITS = ("real", "samples_predicted_correctly", "noise")
LABEL_INITS = ("hard", "soft")


class _IterationLoader:
    """The training "data": the indices of the remaining outer iterations.

    Its length is the TOTAL number of iterations: a run resumed mid-epoch restores
    Lightning's batch counter (the iterations already done) and iterates the rest, so
    the epoch ends when the iterator is exhausted. (With a length of "remaining
    iterations", a 6-iteration run resumed after iteration 2 stopped at iteration 4.)

    A plain iterable, not a DataLoader: Lightning injects no (distributed) sampler into
    it, so every rank runs every iteration. Its position is the module's ``iteration``
    buffer, restored with the module, so it has no state of its own (``state_dict`` is
    empty), which tells Lightning it resumes mid-epoch correctly.
    """

    def __init__(self, module: DistillationModule) -> None:
        self.module = module

    def __len__(self) -> int:
        return int(self.module.hparams.iterations)

    def __iter__(self) -> Iterator[int]:
        yield from range(int(self.module.iteration), int(self.module.hparams.iterations))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class DistillationModule(pl.LightningModule):
    """Synthetic images, labels and syn_lr distilled by trajectory matching.

    Args:
        store: path of a :class:`~lightning_distill.TrajectoryStore` (the experts).
        ipc: images per class.
        iterations: outer iterations to run.
        syn_steps: N, student steps per iteration.
        expert_epochs: M, the target is snapshot t + M.
        max_start_epoch: T+ of the default window (used without a MatchingWindow callback).
        batch_syn: synthetic minibatch size (None: the whole set).
        lr_img, lr_lr, lr_y: SGD learning rates of pixels, syn_lr and label logits.
        lr_teacher: initial syn_lr.
        image_init: "real", "samples_predicted_correctly" (DATM) or "noise".
        label_init: "hard" (class ids) or "soft" (DATM: mean logits of the experts that
            classify the image correctly).
        learn_labels: make the labels learnable logits (implies soft labels).
        label_experts: number of experts averaged for the soft-label initialisation
            (None: every expert of the store, as DATM does).
        init_expert: the expert whose final snapshot selects correctly classified images
            first; the following experts of the store are tried when it classifies fewer
            than ``ipc`` images of a class correctly (DATM).
        threshold: DATM skip threshold (None: never skip).
        mode: "full", "recompute" or "tesla" (see trajectory_matching_loss).
        match: "last" (match the student's last step) or "closest" (ATT, Liu et al.,
            ECCV 2024: the step closest to the target; see trajectory_matching).
        param_mask: PAD's parameter selection (Li et al., 2024) by name: match only
            these parameters or modules (e.g. ``["features.6", "classifier"]``).
        param_drop_ratio: PAD's parameter selection by depth: drop the shallowest fraction
            of the flattened parameters from the loss (0: match all; PAD uses 0.25-0.75).
        dsa, dsa_strategy, dsa_flip: DSA in the inner loop (``dsa_flip`` None: flip
            unless the store's data set is a digit set, as ``dsa_flip_for`` decides).
        max_nonfinite: consecutive non-finite iterations before training stops.
        syn_lr_min, syn_lr_max: the syn_lr clamp.
        seed: seeds initialisation and every random draw (per rank under DDP).
        export_path: where the SyntheticSet is written (at the end and with every
            checkpoint); an EMA set goes next to it with the suffix ``_ema``.
    """

    def __init__(
        self,
        store: str,
        ipc: int,
        *,
        iterations: int = 5000,
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int = 20,
        batch_syn: int | None = None,
        lr_img: float = 100.0,
        lr_lr: float = 1e-5,
        lr_y: float = 2.0,
        lr_teacher: float = 0.01,
        img_momentum: float = 0.5,
        lr_momentum: float = 0.5,
        y_momentum: float = 0.9,
        image_init: str = "real",
        label_init: str = "hard",
        learn_labels: bool = False,
        label_experts: int | None = None,
        init_expert: int = 0,
        threshold: float | None = None,
        mode: str = "full",
        match: str = "last",
        param_mask: list[str] | None = None,
        param_drop_ratio: float = 0.0,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_DSA_STRATEGY,
        dsa_flip: bool | None = None,
        max_nonfinite: int = 10,
        syn_lr_min: float = 1e-6,
        syn_lr_max: float = 10.0,
        seed: int = 0,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if image_init not in IMAGE_INITS:
            raise InputError(f"image_init must be one of {IMAGE_INITS}, got {image_init!r}")
        if label_init not in LABEL_INITS:
            raise InputError(f"label_init must be one of {LABEL_INITS}, got {label_init!r}")
        if ipc < 1:
            raise InputError(f"ipc must be >= 1, got {ipc}")
        if mode not in MATCHING_MODES:
            raise InputError(f"mode must be one of {MATCHING_MODES}, got {mode!r}")
        if match not in MATCH_RULES:
            raise InputError(f"match must be one of {MATCH_RULES}, got {match!r}")
        if param_mask is not None and param_drop_ratio:
            raise InputError("give param_mask (parameter names) or param_drop_ratio (a depth "
                             "ratio), not both")
        if label_experts is not None and label_experts < 1:
            raise InputError(f"label_experts must be >= 1 or None (all), got {label_experts}")
        if not 0.0 < syn_lr_min < syn_lr_max:
            raise InputError(f"need 0 < syn_lr_min < syn_lr_max, got syn_lr_min={syn_lr_min}, "
                             f"syn_lr_max={syn_lr_max}")
        if not syn_lr_min <= lr_teacher <= syn_lr_max:
            raise InputError(f"lr_teacher={lr_teacher} (the initial syn_lr) is outside "
                             f"[syn_lr_min, syn_lr_max] = [{syn_lr_min}, {syn_lr_max}]")
        if iterations < 0 or syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 1:
            raise InputError("need iterations >= 0, syn_steps >= 1, expert_epochs >= 1 and "
                             f"max_start_epoch >= 1, got {iterations}, {syn_steps}, "
                             f"{expert_epochs}, {max_start_epoch}")
        if max_nonfinite < 1:
            raise InputError(f"max_nonfinite must be >= 1, got {max_nonfinite}")
        for name, value in (("lr_img", lr_img), ("lr_lr", lr_lr), ("lr_y", lr_y)):
            if not value >= 0:  # also NaN
                raise InputError(f"{name} must be >= 0 (an SGD learning rate), got {value}")
        for name, value in (("img_momentum", img_momentum), ("lr_momentum", lr_momentum),
                            ("y_momentum", y_momentum)):
            if not 0 <= value < 1:
                raise InputError(f"{name} must be in [0, 1), got {value}")
        self._store: TrajectoryStore | None = None
        st = self.store
        m = st.model
        self.num_classes = int(m["num_classes"])
        size = m["image_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        n = self.num_classes * ipc
        self.images = nn.Parameter(torch.zeros(n, int(m["channels"]), h, w))
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        class_ids = torch.arange(self.num_classes).repeat_interleave(ipc)
        self.register_buffer("_class_ids", class_ids)
        if learn_labels:
            self.labels = nn.Parameter(torch.zeros(n, self.num_classes))
        elif label_init == "soft":
            self.register_buffer("labels", torch.zeros(n, self.num_classes))
        else:
            self.register_buffer("labels", class_ids.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long))
        self.register_buffer("nonfinite_streak", torch.tensor(0, dtype=torch.long))
        self.register_buffer("skipped", torch.tensor(0, dtype=torch.long))
        self.register_buffer("syn_lr_clamps", torch.tensor(0, dtype=torch.long))
        self._student = [st.build_model()]  # a list: not a submodule, not a parameter
        mask = None
        if param_mask is not None:
            mask = parameter_mask(st.spec, layers=list(param_mask))
        elif param_drop_ratio:
            mask = parameter_mask(st.spec, drop_ratio=param_drop_ratio)
        # moves with the module; not in checkpoints (it follows from the hyperparameters)
        self.register_buffer("param_mask", mask, persistent=False)
        if dsa_flip is None:  # as the experts were trained: no flip for digit data sets
            dsa_flip = dsa_flip_for(st.dataset)
        self.augment = DSA(dsa_strategy, flip=dsa_flip) if dsa else None
        self.matching_window = None  # set by the MatchingWindow callback
        self.synthetic_ema = None  # set by the SyntheticEMA callback
        self.to_pixels = None  # input space -> [0, 1] pixels, for image grids
        self.input_space: dict | None = dict(st.input_space) if st.input_space else None
        self.last_step_taken = False
        self._generator: torch.Generator | None = None
        self._pending_generator_states: Tensor | None = None
        self._experts = st.expert_indices()
        self._check_store()

    # ------------------------------------------------------------------ the experts
    @property
    def store(self) -> TrajectoryStore:
        if self._store is None:
            self._store = TrajectoryStore.open(self.hparams.store)
        return self._store

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def _check_store(self) -> None:
        hp, st = self.hparams, self.store
        if not self._experts:
            raise InputError(f"trajectory store {st.path} holds no experts; run "
                             "`lightning-distill experts` first")
        st.validate(deep=True)  # sizes, and every file's header (dtype, shape): no data read
        self.check_window(hp.max_start_epoch)
        if hp.init_expert not in self._experts:
            raise InputError(f"init_expert={hp.init_expert} is not in {st.path} "
                             f"(experts present: {self._experts[:10]}...)")
        batch = self.hparams.batch_syn
        if batch is not None and not 0 < batch <= self.images.shape[0]:
            raise InputError(f"batch_syn={batch} must be in [1, {self.images.shape[0]}] "
                             f"(classes * ipc)")

    def check_window(self, max_start_epoch: int) -> None:
        """Refuse a window whose last start epoch + M runs past the snapshots."""
        need = max_start_epoch - 1 + self.hparams.expert_epochs
        if need > self.store.num_snapshots - 1:
            raise InputError(
                f"matching window runs past the stored snapshots: max_start_epoch="
                f"{max_start_epoch} with expert_epochs={self.hparams.expert_epochs} needs "
                f"snapshot {need}, but {self.store.path} has epochs 0.."
                f"{self.store.num_snapshots - 1}; lower max_start_epoch or train longer "
                "experts")

    # ------------------------------------------------------------- initialisation
    def _expert_logits(self, expert: int, x: Tensor, batch: int = 512) -> Tensor:
        theta = self.store.final_snapshot(expert).to(x.device, x.dtype)
        params = self.store.spec.unflatten(theta)
        net = self.student.to(x.device)
        with torch.no_grad():
            return torch.cat([functional_call(net, params, (x[i:i + batch],))
                              for i in range(0, x.shape[0], batch)])

    @torch.no_grad()
    def initialize(self, datamodule: Any = None, *, train_images: Tensor | None = None,
                   train_labels: Tensor | None = None) -> None:
        """Initialise images (and soft labels) from real training data in input space.

        Pass a :class:`~lightning_distill.data.RealDataModule` (its training part, not
        the validation split) or the tensors directly.
        """
        hp = self.hparams
        if train_images is None:
            if datamodule is None:
                raise InputError("initialize needs a datamodule or train_images/train_labels")
            if getattr(datamodule, "train_set", None) is None:
                datamodule.setup("fit")
            # a streamed split (data too large to hold) is read by rows: the class
            # permutations' first rows, or those an expert classifies correctly
            train_images = images_view(datamodule.train_set)
            train_labels = split_labels(datamodule.train_set)
            if self.input_space is not None and getattr(datamodule, "input_space", None):
                self._check_input_space(datamodule.input_space)
            if getattr(datamodule, "from_input_space", None) is not None:
                self.to_pixels = datamodule.from_input_space
        if tuple(train_images.shape[1:]) != tuple(self.images.shape[1:]):
            raise InputError(f"real images have shape {tuple(train_images.shape[1:])}, the "
                             f"store's model expects {tuple(self.images.shape[1:])}")
        start = time.monotonic()
        soft = hp.label_init == "soft" or hp.learn_labels
        n_label = len(self._experts) if hp.label_experts is None else min(
            hp.label_experts, len(self._experts))
        # the experts' logits over the training images take seconds to minutes: say so
        rank_zero_info(
            f"distill: initialising {hp.ipc} image(s) per class ({hp.image_init})"
            + (f" and soft labels from {n_label} expert(s)" if soft else "") + " ...")
        g = torch.Generator().manual_seed(derive_seed(hp.seed, 0x1D17))
        perms = class_permutations(train_labels, self.num_classes, hp.ipc, g)
        if hp.image_init == "samples_predicted_correctly":
            # init_expert first, then the following experts of the store (DATM)
            at = self._experts.index(hp.init_expert)
            order = self._experts[at:] + self._experts[:at]
            chosen = [correct_sample_indices(train_images, perm, c, hp.ipc, order,
                                             self._expert_logits)[0]
                      for c, perm in enumerate(perms)]
        else:
            chosen = [perm[:hp.ipc] for perm in perms]
        chosen = torch.cat(chosen)
        if hp.image_init == "noise":
            images = torch.randn(self.images.shape, generator=g)
        else:
            images = train_images[chosen].to(self.images.dtype)
        self.images.data.copy_(images)
        if soft:
            self.labels.data.copy_(soft_label_logits(self.images.data, self._class_ids,
                                                     self._experts[:n_label],
                                                     self._expert_logits,
                                                     dtype=self.labels.dtype))
        self.initialized.fill_(True)
        rank_zero_info(f"distill: synthetic set initialised in {time.monotonic() - start:.1f} s")

    def _check_input_space(self, input_space: dict) -> None:
        diff = InputSpace.coerce(input_space).mismatch(self.input_space)
        if diff is not None:
            raise InputError(
                f"the real data's input space differs from the trajectory store's: "
                f"{diff} in {self.store.path}/meta.json; "
                "use the data settings (normalisation / ZCA) the experts were trained with")

    # ------------------------------------------------------------------ Lightning
    def train_dataloader(self) -> _IterationLoader:
        return _IterationLoader(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """ONE SGD optimizer, a parameter group each for the pixels (lr_img,
        img_momentum), syn_lr (lr_lr, lr_momentum) and, when learned, the labels (lr_y,
        y_momentum): the same update as one SGD per tensor, and one optimizer step per
        iteration, so ``trainer.global_step`` counts iterations (docs/design.md, 'Steps
        are iterations')."""
        hp = self.hparams
        groups = [{"params": [self.images], "lr": hp.lr_img, "momentum": hp.img_momentum},
                  {"params": [self.syn_lr], "lr": hp.lr_lr, "momentum": hp.lr_momentum}]
        if hp.learn_labels:
            groups.append({"params": [self.labels], "lr": hp.lr_y, "momentum": hp.y_momentum})
        return torch.optim.SGD(groups)

    #: The training "batches" are this module's outer iterations, whatever datamodule is
    #: attached: :class:`~lightning_distill.data.RealDataModule` serves
    #: ``train_dataloader()`` from the module when this is True (its real data are for
    #: the initialisation, the validation split and the test set).
    owns_train_loader = True

    def _attached_trainer(self) -> pl.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def setup(self, stage: str) -> None:
        check_fit(self)
        if self.matching_window is not None:
            self.check_window(self.matching_window.max_start_epoch)
        trainer = self._attached_trainer()
        if trainer is not None and str(trainer.precision) == "16-mixed":
            raise ConfigError(
                "trainer.precision: DistillationModule does not support '16-mixed': its "
                "GradScaler scales the matching loss but not the inner losses whose float16 "
                "gradients the unroll differentiates (they underflow); use 'bf16-mixed' or "
                "'32-true' (docs/method.md, 'Mixed precision')")
        dm = trainer.datamodule if trainer is not None else None
        if (stage == "fit" and dm is not None and is_overridden("train_dataloader", dm)
                and not (isinstance(dm, DefersTrainLoader) and dm.defers_train_loader)):
            raise InputTypeError(
                f"DistillationModule: the datamodule {type(dm).__name__} defines "
                "train_dataloader(), whose batches would replace the outer iterations; fit "
                "with a RealDataModule (which serves the module's iterations and keeps the "
                "real data for initialisation and validation), or call "
                "module.initialize(datamodule) and fit(module) without a datamodule")

    def on_fit_start(self) -> None:
        # After a checkpoint restore (``initialized`` then comes from the checkpoint), so a
        # resumed run needs no real data.
        dm = getattr(self.trainer, "datamodule", None)
        if not bool(self.initialized):
            if dm is None:
                raise StateError("DistillationModule is not initialised: call "
                                 "module.initialize(datamodule) before fit, fit with "
                                 "datamodule=RealDataModule(...), or resume from a checkpoint")
            self.initialize(dm)
        elif self.to_pixels is None and getattr(dm, "from_input_space", None) is not None:
            self.to_pixels = dm.from_input_space
        self.student.to(self.device)
        self.generator  # noqa: B018  (create it now, per rank)

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of every random draw of this rank (saved in checkpoints)."""
        if self._generator is None:
            rank = self.global_rank if self._attached_trainer() is not None else 0
            gen = torch.Generator()
            states = self._pending_generator_states
            if states is not None and rank < states.shape[0]:
                gen.set_state(states[rank].clone())
            else:
                if states is not None:
                    warnings.warn("resuming with more ranks than the checkpoint had: the "
                                  "extra ranks start fresh random streams", stacklevel=2)
                gen.manual_seed(derive_seed(self.hparams.seed, 0x5EED, rank))
            self._generator = gen
        return self._generator

    def on_train_epoch_start(self) -> None:
        if int(self.iteration) >= self.hparams.iterations:
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if int(self.iteration) >= self.hparams.iterations:
            self.trainer.should_stop = True
            return -1
        return None

    def current_labels(self) -> Tensor:
        return self.labels

    def class_ids(self) -> Tensor:
        return self._class_ids

    def _sample_trajectory(self, it: int) -> tuple[int, int]:
        g = self.generator
        expert = self._experts[int(torch.randint(len(self._experts), (1,), generator=g))]
        if self.matching_window is not None:
            start = self.matching_window.sample(it, g)
        else:
            start = int(torch.randint(0, self.hparams.max_start_epoch, (1,), generator=g))
        return expert, start

    def matching_loss(self, it: int) -> tuple[Tensor, dict[str, float]]:
        """Sample a trajectory segment and return the matching loss (with its graph)."""
        hp = self.hparams
        expert, start_epoch = self._sample_trajectory(it)
        dtype, device = self.images.dtype, self.images.device
        start = self.store.snapshot(expert, start_epoch).to(device, dtype, non_blocking=True)
        target = self.store.snapshot(expert, start_epoch + hp.expert_epochs).to(
            device, dtype, non_blocking=True)
        n = self.images.shape[0]
        # CPU index tensors: trajectory_matching_loss checks them on the CPU and moves
        # them to the device in one copy
        batches = sample_minibatches(n, hp.batch_syn or n, hp.syn_steps, self.generator)
        res = trajectory_matching(
            self.student, start, target, self.images, self.current_labels(), self.syn_lr,
            batches, augment=self.augment, mode=hp.mode, generator=self.generator,
            param_mask=self.param_mask, match=hp.match)
        info = {"expert": float(expert), "start_epoch": float(start_epoch)}
        if hp.match == "closest":
            info["matched_step"] = float(res.step)
        return res.loss, info

    def _trainables(self) -> list[Tensor]:
        return [p for p in (self.images, self.syn_lr, self.labels) if p.requires_grad]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        hp = self.hparams
        it = int(self.iteration)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=False)
        loss, info = self.matching_loss(it)
        value = float(loss.detach())
        finite = math.isfinite(value)
        accept = finite and (hp.threshold is None or value <= hp.threshold)
        if accept:
            self.manual_backward(loss)
        else:  # every rank must take part in DDP's gradient all-reduce
            self.manual_backward(sum(p.sum() * 0.0 for p in self._trainables()))
        # After DDP's all-reduce the gradients are the same on every rank, so is this:
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in self._trainables())
        count, world, nonfinite = self._vote(accept, finite)
        stats = {"loss": value, "syn_lr": float(self.syn_lr.detach()), **info}
        if count > 0 and grads_finite:
            if world > 1 and count < world:
                for p in self._trainables():
                    p.grad.mul_(world / count)
            stats["grad_norm/images"] = float(self.images.grad.norm())
            stats["grad/syn_lr"] = float(self.syn_lr.grad)
            if hp.learn_labels:
                stats["grad_norm/labels"] = float(self.labels.grad.norm())
            opt.step()
            self._clamp_syn_lr()
            self.nonfinite_streak.zero_()
            self.last_step_taken = True
            if self.synthetic_ema is not None:  # here, not in a hook: callback order is free
                self.synthetic_ema.update(self.images)
        else:
            # a skipped iteration is still a step of the run: a step without gradients
            # changes no parameter and no momentum, and the Trainer counts it (not under
            # a GradScaler, 16-mixed, which refuses a step without gradients)
            opt.zero_grad(set_to_none=True)
            trainer = self._attached_trainer()
            if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is None:
                opt.step()
            self.skipped += 1
            self.last_step_taken = False
            if nonfinite or not grads_finite:
                self.nonfinite_streak += 1
                if int(self.nonfinite_streak) >= hp.max_nonfinite:
                    raise StateError(
                        f"distillation stopped: {int(self.nonfinite_streak)} consecutive "
                        f"iterations with a non-finite loss or gradient (iteration {it}, "
                        f"syn_lr {float(self.syn_lr):.3g}); lower lr_img / lr_lr, or use a "
                        "smaller syn_steps, and resume from the last checkpoint")
        self.iteration += 1
        if int(self.iteration) >= hp.iterations and self._attached_trainer() is not None:
            self.trainer.should_stop = True  # the run is over whatever max_epochs says
        stats.update(skipped=float(self.skipped), syn_lr_clamps=float(self.syn_lr_clamps))
        if self.matching_window is not None:
            stats["window/upper_bound"] = float(self.matching_window.last_upper_bound)
        self._log_stats(stats)
        return loss.detach()

    def _vote(self, accept: bool, finite: bool) -> tuple[float, int, bool]:
        """The DDP-consistent step decision: ``(ranks that contributed, world size, any
        rank with a non-finite loss)``, summed over the ranks so that every rank decides
        the same (a rank raising alone would leave the others waiting forever)."""
        votes = torch.tensor([float(accept), float(not finite)], device=self.device)
        trainer = self._attached_trainer()
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            votes = self.trainer.strategy.reduce(votes, reduce_op="sum")
        return float(votes[0]), world, float(votes[1]) > 0

    @torch.no_grad()
    def _clamp_syn_lr(self) -> None:
        lo, hi = self.hparams.syn_lr_min, self.hparams.syn_lr_max
        v = float(self.syn_lr)
        if not lo <= v <= hi:
            self.syn_lr.clamp_(lo, hi)
            self.syn_lr_clamps += 1

    #: statistics shown in the progress bar as well (all go to every logger)
    PROGRESS_BAR_STATS = ("loss", "syn_lr")

    def _log_stats(self, stats: dict[str, float]) -> None:
        """``self.log`` each statistic as ``distill/<name>`` at this iteration (the logger
        step is the iteration index): every logger receives them at the Trainer's
        ``log_every_n_steps`` and ModelCheckpoint / EarlyStopping can monitor them
        (``trainer.callback_metrics``). Names: docs/formats.md, 'Logged metrics'."""
        for name, value in stats.items():
            self.log(f"distill/{name}", float(value), on_step=True, on_epoch=False,
                     prog_bar=name in self.PROGRESS_BAR_STATS, batch_size=1)

    # --------------------------------------------------------- synthetic set export
    def _meta(self) -> dict[str, Any]:
        st = self.store
        return {"dataset": st.dataset, "ipc": int(self.hparams.ipc),
                "num_classes": self.num_classes, "channels": int(self.images.shape[1]),
                "image_size": list(self.images.shape[2:]), "input_space": self.input_space,
                "source_store": str(st.path), "iteration": int(self.iteration),
                "model": dict(st.model),
                # which run a set found on disk came from
                "seed": int(self.hparams.seed), "library_version": __version__}

    def synthetic_set(self):
        """The current images, labels and syn_lr as a :class:`SyntheticSet` (CPU copies)."""
        from ..data.synthetic import SyntheticSet

        return SyntheticSet(images=self.images.detach().cpu().clone(),
                            labels=self.labels.detach().cpu().clone(),
                            lr=float(self.syn_lr.detach()), meta=self._meta())

    def ema_synthetic_set(self):
        """The SyntheticEMA average as a SyntheticSet, or None without the callback."""
        ema = self.synthetic_ema
        if ema is None or ema.initial is None:
            return None
        syn = self.synthetic_set()
        syn.images = ema.average.detach().cpu().clone()
        syn.meta["ema"] = {"decay": ema.decay, "bias_correction": ema.bias_correction}
        return syn

    def export(self, path: str | None = None) -> None:
        """Write the SyntheticSet (and the EMA set) to ``path`` or ``export_path``."""
        path = path or self.hparams.export_path
        trainer = self._attached_trainer()
        if path is None or (trainer is not None and not trainer.is_global_zero):
            return
        self.synthetic_set().save(path, to_pixels=self.to_pixels)
        ema = self.ema_synthetic_set()
        if ema is not None:
            stem = path[:-3] if path.endswith(".pt") else path
            ema.save(stem + "_ema.pt", to_pixels=self.to_pixels)

    def on_train_end(self) -> None:
        self.export()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.generator.get_state()
        trainer = self._attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            states = self.all_gather(state.to(self.device)).cpu()
        else:
            states = state.unsqueeze(0)
        checkpoint["distill_generator_states"] = states
        self.export()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_generator_states = checkpoint.get("distill_generator_states")
        self._generator = None
        states = checkpoint.get("optimizer_states")
        if isinstance(states, list) and len(states) > 1:
            # a checkpoint of version 0.1.0.dev0 before one optimizer: one SGD per tensor,
            # each of one group, in the order of today's groups
            groups, state = [], {}
            for k, old in enumerate(states):
                (group,) = old["param_groups"]
                groups.append({**group, "params": [k]})
                if old["state"]:
                    state[k] = old["state"][0]
            checkpoint["optimizer_states"] = [{"state": state, "param_groups": groups}]
