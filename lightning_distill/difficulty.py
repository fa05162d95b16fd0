"""Difficulty scores of the training split, computed once and cached with the data's identity.

PAD (Li et al., "Prioritize Alignment in Dataset Distillation", 2024) orders each class of
the training set by EL2N (:func:`~lightning_distill.functional.el2n_scores`, higher =
harder) averaged over networks trained briefly on the full training split, and trains the
experts easiest first (:class:`~lightning_distill.functional.PADSchedule`).

:func:`compute_el2n` trains ``num_models`` networks of the experts' architecture, each
seeded from ``(seed, k)`` alone (initialisation ``derive_seed(seed, k)``, batch order
``derive_seed(seed, k, 1)``), with the plain evaluation loop
(:func:`~lightning_distill.functional.evaluation.train_and_evaluate`): ``epochs`` epochs of
SGD (momentum 0.9, weight decay 5e-4, constant ``lr``, no augmentation) on the whole
training split (validation held out), then scores every training sample, un-augmented,
in eval mode. The score of a sample is the mean over the networks.

:func:`load_or_compute_el2n` caches the result in one file (default
``<trajectory store>/difficulty_el2n.pt``)::

    {"format": "lightning_distill.difficulty", "format_version": 1, "score": "el2n",
     "scores": float32 [N], "per_model": float32 [num_models, N],
     "identity": {...}, "settings": {...}, "model_accuracy": [...], "created": ...,
     "library_version": ..., "torch_version": ...}

``identity`` (:func:`data_identity`) names the data set, the training split's size and
class sizes, a SHA-256 of the split's indices, labels and raw pixels, and the input space
(normalisation or ZCA fingerprint); ``settings`` the score, the network and the training
settings. A second run with the same identity and settings loads the file instead of
training; a file whose identity or settings differ is refused (or, with
``on_mismatch="recompute"``, replaced) with a message naming the fields. The file is
published first-writer-wins (:func:`~lightning_distill.io.atomic_save_new`) and every
caller returns what is on disk, so shards of the experts stage that race to compute it
all use the same scores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .artifacts import TensorChunks, check_header, header, sha256
from .data import splits
from .data.splits import images_view, split_labels
from .errors import DataFormatError, InputError, StateError
from .functional.difficulty import el2n_scores
from .functional.evaluation import seeded_model, train_and_evaluate
from .io import atomic_save, atomic_save_new
from .seeding import derive_seed

__all__ = [
    "DIFFICULTY_FILE",
    "DifficultyScores",
    "DifficultyScoresError",
    "compute_el2n",
    "data_identity",
    "el2n_settings",
    "load_or_compute_el2n",
]

DIFFICULTY_FILE = "difficulty_el2n.pt"
FORMAT = "lightning_distill.difficulty"
FORMAT_VERSION = 1
_SCORE_BATCH = 1024


class DifficultyScoresError(DataFormatError, RuntimeError):
    """A difficulty-score file is corrupt or belongs to other data or settings."""


@dataclass
class DifficultyScores:
    """Scores of the training split (``scores[i]`` is ``train_set`` row ``i``)."""

    scores: Tensor
    per_model: Tensor
    identity: dict[str, Any]
    settings: dict[str, Any]
    path: Path | None = None
    computed: bool = False  # True when this call trained the scoring networks
    model_accuracy: list[float] = field(default_factory=list)  # held-out, per network

    @property
    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the float32 scores: which scores the experts used."""
        return sha256(self.scores.float().contiguous().numpy().tobytes(), length=16)


def _sha(*tensors: Tensor | TensorChunks) -> str:
    return sha256(*tensors, length=16)


def _codes_of(codes: Tensor, idx: Tensor) -> TensorChunks:
    """``codes.index_select(0, idx)`` as a hash part, gathered
    :data:`~lightning_distill.data.splits.HASH_CHUNK_ROWS` rows at a time (the same
    digest as the whole gather, which a memory-mapped data set larger than memory could
    not hold)."""
    step = splits.HASH_CHUNK_ROWS
    return TensorChunks(codes.dtype, (int(idx.numel()), *codes.shape[1:]), lambda: (
        codes.index_select(0, idx[i : i + step]) for i in range(0, int(idx.numel()), step)))


def data_identity(dm: Any) -> dict[str, Any]:
    """What the scores belong to: a set-up :class:`RealDataModule`'s training split.

    ``{"dataset", "train_size", "num_classes", "class_sizes", "split": {"val_fraction",
    "seed"}, "fingerprint", "input_space"}``; ``fingerprint`` hashes the split's indices
    into the data set's training images, their labels and their raw pixel codes (read
    in chunks: the digest of the whole gather, held or streamed alike).
    """
    if dm.train_set is None or dm.train_idx is None:
        raise StateError("data_identity: call setup() on the datamodule first")
    real = dm.real
    labels = split_labels(dm.train_set)
    idx = dm.train_idx.long()
    return {
        "dataset": real.name,
        "train_size": int(idx.numel()),
        "num_classes": int(real.num_classes),
        "class_sizes": torch.bincount(labels, minlength=real.num_classes).tolist(),
        "split": {"val_fraction": float(dm.val_fraction), "seed": int(dm.split_seed)},
        "fingerprint": _sha(idx, labels.long(), _codes_of(real.train_data, idx)),
        "input_space": None if dm.input_space is None else dm.input_space.to_dict(),
    }


def el2n_settings(
    model: dict[str, Any],
    *,
    num_models: int = 10,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> dict[str, Any]:
    """The settings dict of :func:`compute_el2n` (also the cache's ``settings``), checked."""
    if int(num_models) < 1 or int(epochs) < 1 or int(batch_size) < 1:
        raise InputError(
            "EL2N scores: num_models, epochs and batch_size must be >= 1; got "
            f"{num_models}, {epochs}, {batch_size}"
        )
    if not float(lr) > 0:
        raise InputError(f"EL2N scores: lr must be > 0, got {lr}")
    if "name" not in model:
        raise InputError(f"EL2N scores: model needs a 'name' (build_model kwargs), got {model!r}")
    return {
        "score": "el2n",
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model).items()},
        "num_models": int(num_models),
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "augment": None,
    }


@torch.no_grad()
def _logits(net: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    net.eval()
    out = [net(x[i : i + _SCORE_BATCH].to(device)).float().cpu()
           for i in range(0, x.shape[0], _SCORE_BATCH)]
    return torch.cat(out)


def compute_el2n(
    dm: Any,
    settings: dict[str, Any],
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> DifficultyScores:
    """Train ``settings["num_models"]`` networks briefly and score the training split.

    Args:
        dm: a set-up :class:`~lightning_distill.data.RealDataModule`.
        settings: from :func:`el2n_settings` (network, epochs, lr, batch size, seed).
        device: where the networks train.
        log: optional ``print``-like function for one line per network.

    Returns:
        :class:`DifficultyScores` (not saved; see :func:`load_or_compute_el2n`).
    """
    device = torch.device(device)
    real = dm.real
    # a held split's tensors; a streamed split's images read a batch at a time (training
    # gathers each batch's rows, scoring and the held-out test read slices)
    x, y = images_view(dm.train_set), split_labels(dm.train_set)
    if dm.val_set is not None and len(dm.val_set) > 0:
        test_x, test_y = images_view(dm.val_set), split_labels(dm.val_set)
    else:
        test_x, test_y = x[:_SCORE_BATCH], y[:_SCORE_BATCH]
    model = dict(settings["model"])
    name = model.pop("name")
    for key in ("channels", "num_classes", "image_size"):
        model.pop(key, None)
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    seed = int(settings["seed"])
    per_model, accuracy = [], []
    for k in range(int(settings["num_models"])):
        start = time.perf_counter()
        net = seeded_model(name, real.channels, real.num_classes, real.image_size,
                           seed=derive_seed(seed, k), **model).to(device)
        order = torch.Generator().manual_seed(derive_seed(seed, k, 1))
        result = train_and_evaluate(
            net, x, y, lr=settings["lr"], epochs=settings["epochs"],
            batch_size=settings["batch_size"], momentum=settings["momentum"],
            weight_decay=settings["weight_decay"], lr_decay_epoch=0, augment=None,
            generator=order, test_images=test_x, test_labels=test_y,
        )
        per_model.append(el2n_scores(_logits(net, x, device), y))
        accuracy.append(float(result["accuracy"]))
        if log is not None:
            log(f"EL2N network {k + 1}/{settings['num_models']}: {settings['epochs']} epochs, "
                f"held-out accuracy {100 * result['accuracy']:.1f}% "
                f"({time.perf_counter() - start:.1f} s)")
    stacked = torch.stack(per_model).float()
    return DifficultyScores(stacked.mean(0), stacked, data_identity(dm), dict(settings),
                            computed=True, model_accuracy=accuracy)


def _differences(kind: str, stored: dict, wanted: dict) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{kind}.{k}: file {str(stored.get(k))[:80]}, run {str(wanted.get(k))[:80]}"
            for k in keys if stored.get(k) != wanted.get(k)]


def _read(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, ...
        raise DifficultyScoresError(
            f"{path} is unreadable or corrupt ({type(e).__name__}: {str(e)[:200]}); delete it "
            "to recompute the scores"
        ) from e
    _check_scores_file(obj, path)
    return obj


def _check_scores_file(obj: Any, path: Path) -> None:
    """Refuse a file that is not a difficulty-score file this library reads (the header;
    the scores' own identity and settings are compared by :func:`load_or_compute_el2n`)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DifficultyScoresError(f"{path} is not a lightning_distill difficulty-score file; "
                                    "delete it to recompute the scores")
    check_header(obj, FORMAT, FORMAT_VERSION, path, error=DifficultyScoresError,
                 fix="delete it to recompute the scores")


def load_or_compute_el2n(
    path: str | os.PathLike,
    dm: Any,
    settings: dict[str, Any],
    device: torch.device | str = "cpu",
    on_mismatch: str = "error",
    log: Callable[[str], None] | None = None,
) -> DifficultyScores:
    """The EL2N scores of ``dm``'s training split: loaded from ``path`` when it holds scores
    of the same data and settings, else computed (:func:`compute_el2n`) and saved there.

    Args:
        path: the cache file (its directory is created).
        dm: a set-up :class:`~lightning_distill.data.RealDataModule`.
        settings: :func:`el2n_settings`.
        device: where the scoring networks train, if they must.
        on_mismatch: ``"error"`` (raise :class:`DifficultyScoresError` naming the fields
            that differ) or ``"recompute"`` (replace the file) when ``path`` holds scores of
            other data or settings.
        log: optional ``print``-like function.
    """
    if on_mismatch not in ("error", "recompute"):
        raise InputError(f"on_mismatch must be 'error' or 'recompute', got {on_mismatch!r}")
    path = Path(path)
    identity = data_identity(dm)
    settings = dict(settings)
    replace = False
    if path.is_file():
        obj = _read(path)
        diff = (_differences("identity", obj.get("identity") or {}, identity)
                + _differences("settings", obj.get("settings") or {}, settings))
        if not diff:
            scores = obj["scores"]
            if scores.shape != (identity["train_size"],):
                raise DifficultyScoresError(
                    f"{path}: holds {tuple(scores.shape)} scores for a training split of "
                    f"{identity['train_size']}; delete it to recompute the scores"
                )
            return DifficultyScores(scores.float(), obj["per_model"].float(), identity,
                                    settings, path=path,
                                    model_accuracy=list(obj.get("model_accuracy") or []))
        message = (f"{path} holds difficulty scores of other data or settings: "
                   + "; ".join(diff[:6]))
        if on_mismatch == "error":
            raise DifficultyScoresError(
                message + ". Delete the file to recompute the scores, or point the scores' "
                "cache to another file"
            )
        if log is not None:
            log(message + "; recomputing")
        replace = True
    result = compute_el2n(dm, settings, device=device, log=log)
    payload = {
        **header(FORMAT, FORMAT_VERSION, dm.input_space.to_dict()),
        "score": "el2n",
        "scores": result.scores.contiguous(),
        "per_model": result.per_model.contiguous(),
        "identity": identity,
        "settings": settings,
        "model_accuracy": list(result.model_accuracy),
        "torch_version": str(torch.__version__),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if replace:  # a mismatched file (on_mismatch="recompute")
        atomic_save(payload, path)
    elif not atomic_save_new(payload, path):
        # another process published the scores first: use that file, as it does
        if log is not None:
            log(f"{path} was written by another process meanwhile; using it")
        return load_or_compute_el2n(path, dm, settings, device, "error", log)
    result.path = path
    return result
