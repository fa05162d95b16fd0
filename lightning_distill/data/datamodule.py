"""``RealDataModule``: a real data set in the model's input space, as a LightningDataModule.

``setup()`` loads the data set (:func:`~lightning_distill.data.datasets.get_dataset`),
holds out a seeded, class-stratified validation split of the training set, and maps every
split into the input space the experts, the distillation and the evaluation all share
(docs/method.md, section 'ZCA whitening and normalisation'):

- ``zca=False``: ``x -> (x - mean) / std`` per channel, with the data set's constants;
- ``zca=True``: ZCA whitening of the [0, 1] images (no mean/std normalisation), fitted on
  the training part only (not validation, not test) and applied to every split.

Example::

    dm = RealDataModule("cifar10", zca=True, batch_size=256)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))        # whitened images, labels
    grid = dm.from_input_space(x[:16]).clamp(0, 1)  # back to [0, 1] for display

Loaders (``loader=``): ``"batched"`` (default) serves each batch with one gather
(``index_select``) from the in-memory tensors, see :class:`TensorBatchLoader`; it yields
exactly the batches a ``DataLoader(shuffle=True, generator=...)`` over the same
``TensorDataset`` yields for the same seed, without per-sample indexing and collation.
``"dataloader"`` is the plain ``torch.utils.data.DataLoader`` (implied by ``num_workers > 0``).

Data larger than memory (docs/recipes.md, 'Data larger than memory'): with
``prepared=True`` the data set is written once as uint8 arrays on disk
(:mod:`lightning_distill.data.prepared`) and read from there; a split whose float32
images would pass 1 GiB (or every split, ``hold=False``) is a
:class:`~lightning_distill.data.splits.StreamedSplit`: its loaders gather the uint8 rows
of each batch only (the same order and DDP shards as the held split's) and
:meth:`RealDataModule.on_after_batch_transfer` turns them into input-space images on the
device.

Data selection (:attr:`RealDataModule.train_selection`, e.g. PAD's easy-to-hard schedule for
the experts): a function ``epoch -> indices`` into the training split; when set,
:meth:`RealDataModule.train_dataloader` serves only that epoch's subset. Use it through
:class:`~lightning_distill.callbacks.DataSelection`, which also makes the Trainer request a
new training loader every epoch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_distill.data.datasets import RealDataset, get_dataset
from lightning_distill.data.datasets.container import draw_indices
from lightning_distill.data.input_space import InputSpace
from lightning_distill.data.splits import HeldSplit, StreamedSplit

from ..errors import InputError, StateError
from ..protocols import OwnsTrainLoader

__all__ = ["MemberBatches", "RealDataModule", "SplitBatchLoader", "TensorBatchLoader",
           "shard_indices"]

_CHUNK = 4096
#: a split is held as float32 input-space images when that takes at most this many bytes
#: (``hold=None``); a larger one is streamed (uint8 codes, transformed per batch)
HOLD_LIMIT_BYTES = 1 << 30
#: ZCA of a streamed training part is fitted on this many of its images (seeded by
#: ``split_seed``) unless ``zca_fit_images`` says otherwise
ZCA_STREAMED_FIT_IMAGES = 10_000
_LOADERS = ("batched", "dataloader")


def shard_indices(order: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s share of ``order``, as ``DistributedSampler(drop_last=False)`` cuts it.

    ``order`` (length n) is padded by wrapping around to ``world * ceil(n / world)``
    entries (``order`` repeated, then truncated) and the rank takes
    ``padded[rank::world]``: every rank gets ``ceil(n / world)`` indices, the first
    ``pad`` indices of ``order`` are seen twice per epoch.
    """
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"shard_indices: need 0 <= rank < world, got rank={rank}, world={world}")
    n = order.numel()
    total = math.ceil(n / world) * world
    if total > n:
        order = order.repeat(math.ceil(total / n))[:total]
    return order[rank:total:world]


def _dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` outside one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TensorBatchLoader:
    """Batches of in-memory tensors, one gather per batch (the ``"batched"`` loader).

    Per epoch (each ``iter()``), when shuffling: one int64 drawn from ``generator`` (the
    base seed a ``DataLoader`` iterator draws; the workers' seed there, unused here) and
    then ``order = randperm(n, generator=generator)``, the draw of ``RandomSampler``:
    the batches are therefore identical, epoch after epoch, to those of
    ``DataLoader(TensorDataset(images, labels), batch_size, shuffle=True,
    generator=generator)``. Without shuffling ``order = arange(n)``. Batch ``b`` is
    ``(images[i], labels[i])`` for ``i = order[b * batch_size : (b + 1) * batch_size]``,
    the last batch partial (``drop_last=False``), gathered with ``index_select``
    (into pinned memory when ``pin_memory``, for asynchronous host-to-device copies).

    Under ``torch.distributed`` (initialised, world size > 1) every rank draws the same
    ``order`` (same seed, same number of epochs) and keeps :func:`shard_indices` of it
    (``DistributedSampler(shuffle, drop_last=False)`` sharding: pad by wrapping to a
    multiple of the world size, take ``order[rank::world]``), so the ranks see disjoint
    parts of the epoch, ``ceil(n / world)`` samples each. Rank and world size are read
    at every ``iter()`` / ``len()``.

    With ``indices`` (a subset of the rows, e.g. one epoch of a data-selection schedule)
    everything above applies to ``m = len(indices)`` positions instead of ``n`` rows: the
    order is ``indices[randperm(m)]`` (``indices`` as given without shuffling), sharded
    across ranks the same way; without ``indices`` the loader is exactly as described.

    Args:
        images: CPU tensor ``[N, ...]``.
        labels: CPU tensor ``[N]``.
        batch_size: samples per batch (>= 1).
        shuffle: reshuffle every epoch.
        generator: the CPU generator of the order (a fresh unseeded one if ``None``).
        pin_memory: gather into page-locked memory (default: ``torch.cuda.is_available()``).
        indices: optional int64 ``[m]`` rows of ``images`` / ``labels`` to serve (each in
            ``0..N-1``); ``None`` serves all ``N``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        pin_memory: bool | None = None,
        indices: Tensor | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise InputError(
                f"TensorBatchLoader: images ({images.shape[0]}) and labels "
                f"({labels.shape[0]}) must have the same length"
            )
        if batch_size < 1:
            raise InputError(f"TensorBatchLoader: batch_size must be >= 1, got {batch_size}")
        self.tensors = (images, labels)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.generator = generator if generator is not None else torch.Generator()
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
            n = images.shape[0]
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
                raise InputError(f"TensorBatchLoader: indices must lie in [0, {n})")
        self.indices = indices

    def _rows(self) -> int:
        return int(self.tensors[0].shape[0])

    def _positions(self) -> int:
        """How many positions an epoch covers before sharding: ``len(indices)`` or N."""
        return self._rows() if self.indices is None else self.indices.numel()

    def _num_samples(self) -> int:
        n = self._positions()
        _, world = _dist_rank_world()
        return math.ceil(n / world) if world > 1 else n

    def __len__(self) -> int:
        return math.ceil(self._num_samples() / self.batch_size)

    def order(self) -> Tensor:
        """This rank's sample order for one epoch (advances ``generator`` when shuffling)."""
        n = self._positions()
        if self.shuffle:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        if self.indices is not None:
            order = self.indices[order]
        rank, world = _dist_rank_world()
        return shard_indices(order, rank, world) if world > 1 else order

    def _gather(self, t: Tensor, idx: Tensor) -> Tensor:
        if not self.pin_memory:
            return t.index_select(0, idx)
        out = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=out)

    def _fetch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.tensors
        return self._gather(x, idx), self._gather(y, idx)

    def _trailing_draw(self) -> None:
        # RandomSampler draws one more randperm(n) (and slices it to length 0) once its
        # first permutation is exhausted; DataLoader reaches that point when it collects
        # the last batch (partial) or looks for the next one (n divisible by batch_size).
        if self.shuffle:
            torch.randperm(self._positions(), generator=self.generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order()
        n, bs = order.numel(), self.batch_size
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            if idx.numel() < bs:
                self._trailing_draw()
            yield self._fetch(idx)
        if n % bs == 0:
            self._trailing_draw()


class SplitBatchLoader(TensorBatchLoader):
    """:class:`TensorBatchLoader`'s batches (same order, same sharding) of a
    :class:`~lightning_distill.data.splits.StreamedSplit`: each batch gathers only its
    rows' uint8 codes (from memory, or from a prepared split's file); the
    :class:`RealDataModule` turns them into input-space images after the transfer to the
    device
    (:meth:`RealDataModule.on_after_batch_transfer`)."""

    def __init__(self, split: StreamedSplit, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, pin_memory: bool | None = None,
                 indices: Tensor | None = None) -> None:
        self.split = split
        super().__init__(split.labels, split.labels, batch_size, shuffle=shuffle,
                         generator=generator, pin_memory=pin_memory, indices=indices)

    def _fetch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = self.split.codes_of(idx)
        if self.pin_memory:
            x = x.pin_memory()
        return x, self._gather(self.split.labels, idx)


class MemberBatches:
    r"""K loaders walked in lockstep: batch b is ``(images [K, B, ...], labels [K, B])``,
    member k's part being batch b of ``loaders[k]`` (for a group of experts trained as
    one model, each member with its own seeded order). The loaders must yield batches
    of the same sizes (same data, same batch size), which :class:`TensorBatchLoader`\ s
    over one training set do, also under ``torch.distributed`` (each shards its own
    order, :func:`shard_indices`).
    """

    def __init__(self, loaders: list) -> None:
        if not loaders:
            raise InputError("MemberBatches: need at least one loader")
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for parts in zip(*self.loaders, strict=True):
            yield torch.stack([x for x, _ in parts]), torch.stack([y for _, y in parts])


class RealDataModule(pl.LightningDataModule):
    """A real data set split into train / val / test, transformed into model input space.

    Args:
        name: registered data set name (``list_datasets()``).
        root: data directory (default: ``$LIGHTNING_DISTILL_DATA`` or
            ``~/.cache/lightning_distill/data``).
        batch_size: batch size of all three dataloaders.
        val_fraction: fraction of each class of the training set held out for validation.
        split_seed: seed of the validation split and of the training shuffle order
            (named apart from a LightningModule's ``seed``: Lightning merges both
            hyperparameter sets into one for the loggers).
        shuffle_seed: seed of the training shuffle order alone (default: ``split_seed``); the
            experts stage sets it per expert so each expert sees its own data order
            while the split stays fixed.
        zca: ZCA-whiten instead of mean/std normalisation.
        zca_regularization: eigenvalue shift of the ZCA transform (0.1 in MTT/DATM).
        num_workers: dataloader worker processes (``> 0`` implies ``loader="dataloader"``).
        dataset_kwargs: extra keywords for the data set loader (``download``,
            ``image_size``, ...).
        loader: ``"batched"`` (:class:`TensorBatchLoader`: one ``index_select`` per batch
            from the in-memory tensors, pinned when CUDA is available; same batches as
            the DataLoader for the same seed; under ``torch.distributed`` it shards like
            ``DistributedSampler``) or ``"dataloader"`` (``torch.utils.data.DataLoader``,
            per-sample indexing and collation; Lightning injects its distributed sampler).
        prepared: read the data set from its prepared form (docs/formats.md, 'Prepared
            data'): written once (by ``lightning-distill prepare``, or on first use in
            :meth:`prepare_data`) as uint8 arrays on disk under ``prepared_root``,
            then only the rows a batch needs are read. ``False``: the data set's own
            files, read whole into memory as uint8.
        prepared_root: where prepared data sets live (default ``<root>/prepared``, root
            being ``root`` or the default data root).
        hold: hold every split as float32 input-space images (``True``), or stream it
            (``False``: uint8 codes, gathered per batch and transformed on the batch's
            device by :meth:`on_after_batch_transfer`); ``None``: hold a split whose
            float32 images take at most ``HOLD_LIMIT_BYTES`` (1 GiB), stream a larger
            one. Both give the same images bit for bit on one device.
        zca_fit_images: fit ZCA on this many training-part images (drawn with
            ``split_seed``) instead of all of them; a streamed training part defaults to
            ``ZCA_STREAMED_FIT_IMAGES`` (10,000).

    After ``setup()``: ``real`` (the :class:`RealDataset`), ``train_idx`` / ``val_idx``
    (indices into ``real``'s training split), ``train_set`` / ``val_set`` / ``test_set``
    (each a :class:`~lightning_distill.data.splits.HeldSplit`, a CPU ``TensorDataset`` of
    float32 transformed images and int64 labels, or, past the hold limit or with
    ``hold=False``, a :class:`~lightning_distill.data.splits.StreamedSplit`), ``zca``
    (the fitted transform or ``None``) and ``input_space`` (an :class:`InputSpace`).

    ``train_selection`` (default ``None``): a function ``epoch -> indices`` into
    ``train_set``. When set, :meth:`train_dataloader` serves only the subset of
    ``trainer.current_epoch`` (epoch 0 without a Trainer), in an order drawn from a
    generator seeded with ``derive_seed(shuffle_seed, epoch)`` (``split_seed`` when
    ``shuffle_seed`` is None), so the batches of an epoch are a pure function of the epoch:
    a resumed run sees the same ones. The Trainer must ask for a new loader every epoch
    (``reload_dataloaders_every_n_epochs=1``, which
    :class:`~lightning_distill.callbacks.DataSelection` sets). Under DDP the ``batched``
    loader shards the subset like the full set (:func:`shard_indices`); with
    ``loader="dataloader"`` the loader is over ``Subset(train_set, indices)`` and
    Lightning's DistributedSampler shards it.
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        zca: bool = False,
        zca_regularization: float = 0.1,
        num_workers: int = 0,
        dataset_kwargs: dict[str, Any] | None = None,
        shuffle_seed: int | None = None,
        loader: str = "batched",
        prepared: bool = False,
        prepared_root: str | os.PathLike | None = None,
        hold: bool | None = None,
        zca_fit_images: int | None = None,
    ) -> None:
        super().__init__()
        if loader not in _LOADERS:
            raise InputError(f"RealDataModule: loader must be one of {_LOADERS}, got {loader!r}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.name = name
        self.root = root
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.use_zca = bool(zca)
        self.zca_regularization = float(zca_regularization)
        self.num_workers = int(num_workers)
        self.loader = "dataloader" if self.num_workers > 0 else loader
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.prepared = bool(prepared)
        self.prepared_root = prepared_root
        self.hold = hold
        if zca_fit_images is not None and zca_fit_images < 1:
            raise InputError(f"zca_fit_images must be >= 1, got {zca_fit_images}")
        self.zca_fit_images = zca_fit_images
        self.real: RealDataset | None = None
        # the training order's generators (one, or one per group member) and a state to
        # give them on resume (state_dict / load_state_dict)
        self._order_generators: list[torch.Generator] = []
        self._order_resume: list[Tensor] | None = None
        self.zca: Any = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None
        self.train_set: HeldSplit | StreamedSplit | None = None
        self.val_set: HeldSplit | StreamedSplit | None = None
        self.test_set: HeldSplit | StreamedSplit | None = None
        self.train_selection: Callable[[int], Tensor] | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        """Once per node (Lightning calls it on local rank 0): download when
        ``dataset_kwargs`` asks for it; with ``prepared=True``, write the prepared form if
        it is not there yet (with a progress bar)."""
        if self.dataset_kwargs.get("download"):
            get_dataset(self.name, self.root, **self.dataset_kwargs)
        if self.prepared:
            from lightning_distill.data.prepared import prepare

            prepare(self._source(), self._prepared_root(), progress=True, log=rank_zero_info)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.dataset_kwargs.items() if k != "download"}

    def _source(self) -> Any:
        from lightning_distill.data.datasets.sources import get_source

        return get_source(self.name, self.root, **self._loader_kwargs())

    def _prepared_root(self) -> Path:
        from lightning_distill.data.datasets import default_data_root

        if self.prepared_root is not None:
            return Path(self.prepared_root).expanduser()
        return Path(self.root).expanduser() / "prepared" if self.root is not None \
            else default_data_root() / "prepared"

    def _load(self) -> RealDataset:
        if not self.prepared:
            return get_dataset(self.name, self.root, **self._loader_kwargs())
        from lightning_distill.data.prepared import prepare_if_needed

        return prepare_if_needed(self._source(), self._prepared_root(), log=rank_zero_info)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and transform all splits (runs once; later calls do nothing)."""
        if self.real is not None:
            return
        start = time.monotonic()
        # loading, ZCA fitting and transforming take seconds to minutes on a large set:
        # say what is happening (rank 0, Lightning's logger)
        rank_zero_info(f"data: loading {self.name}"
                       + (f" from {self.root}" if self.root is not None else ""))
        real = self._load()
        train_idx, val_idx = real.split_validation(self.val_fraction, self.split_seed)
        self.real = real
        if self.use_zca:
            from lightning_distill.data.zca import ZCA

            fit_idx = train_idx
            n_fit = self.zca_fit_images
            if n_fit is None and not self._holds(train_idx.numel()):
                n_fit = ZCA_STREAMED_FIT_IMAGES
            if n_fit is not None and n_fit < train_idx.numel():
                g = torch.Generator().manual_seed(self.split_seed)
                fit_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)[:n_fit]]
                fit_idx = fit_idx.sort().values
            rank_zero_info(f"data: fitting ZCA on {fit_idx.numel()} training images "
                           f"(regularization {self.zca_regularization:g})")
            self.zca = ZCA(self.zca_regularization).fit(real.images("train", fit_idx))
        self.train_idx, self.val_idx = train_idx, val_idx
        self.train_set = self._make_split("train", train_idx)
        self.val_set = self._make_split("train", val_idx)
        self.test_set = self._make_split("test", torch.arange(real.test_data.shape[0]))
        kinds = {s.held for s in (self.train_set, self.val_set, self.test_set)}
        kind = "held" if kinds == {True} else "streamed" if kinds == {False} else "held/streamed"
        rank_zero_info(
            f"data: {self.name} ready in {time.monotonic() - start:.1f} s: "
            f"{len(self.train_set)} train / {len(self.val_set)} validation / "
            f"{len(self.test_set)} test images, {real.channels}x{real.image_size[0]}x"
            f"{real.image_size[1]}, {'ZCA-whitened' if self.use_zca else 'normalised'}, "
            f"{kind}" + (" (prepared, read by rows)" if self.prepared else ""))

    def _holds(self, count: int) -> bool:
        """Whether a split of ``count`` images is held as float32 (see ``hold``)."""
        if self.hold is not None:
            return bool(self.hold)
        real = self._real()
        return count * real.channels * real.image_size[0] * real.image_size[1] * 4 \
            <= HOLD_LIMIT_BYTES

    def _make_split(self, split: str, index: Tensor) -> HeldSplit | StreamedSplit:
        real = self._real()
        labels = real.train_labels if split == "train" else real.test_labels
        if not self._holds(index.numel()):
            codes = real.train_data if split == "train" else real.test_data
            return StreamedSplit(codes, labels, index, self.codes_to_input)
        x = torch.empty((index.numel(), real.channels, *real.image_size), dtype=torch.float32)
        for i in range(0, index.numel(), _CHUNK):
            x[i : i + _CHUNK] = self.to_input_space(real.images(split, index[i : i + _CHUNK]))
        return HeldSplit(x, labels[index].clone())

    def codes_to_input(self, codes: Tensor) -> Tensor:
        """uint8 codes (any device, any leading shape) -> input-space float32 images: the
        held splits' transform, ``to_input_space(codes.to(float32) / pixel_scale)``."""
        return self.to_input_space(codes.to(torch.float32).div_(self._real().pixel_scale))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A streamed split's batch ``(uint8 codes, labels)`` becomes ``(input-space
        images, labels)`` here, on the device it was moved to; other batches pass."""
        if (isinstance(batch, (tuple, list)) and len(batch) == 2
                and isinstance(batch[0], Tensor) and batch[0].dtype == torch.uint8):
            return type(batch)([self.codes_to_input(batch[0]), batch[1]])
        return batch

    def _real(self) -> RealDataset:
        if self.real is None:
            raise StateError("RealDataModule: call setup() first")
        return self.real

    # ---------------------------------------------------------------- input space
    def to_input_space(self, x01: Tensor) -> Tensor:
        """[0, 1] images -> model input: ``zca.transform(x)`` or ``(x - mean) / std``."""
        return self._transform(inverse=False)(x01)

    def from_input_space(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`to_input_space` (inverse ZCA or ``x * std + mean``), for display."""
        return self._transform(inverse=True)(x)

    def _transform(self, inverse: bool) -> Callable[[Tensor], Tensor]:
        if self.use_zca:
            if self.zca is None:
                raise StateError("RealDataModule: call setup() first (ZCA is not fitted)")
            return self.zca.inverse if inverse else self.zca.transform
        real = self._real()
        return real.denormalize if inverse else real.normalize

    @property
    def input_space(self) -> InputSpace:
        """Identity of the input space, for metadata of trajectory stores and synthetic sets
        (its dict form is what files hold: docs/formats.md, section 'Input space')."""
        real = self._real()
        if self.use_zca:
            if self.zca is None:
                raise StateError("RealDataModule: call setup() first (ZCA is not fitted)")
            return InputSpace.zca(real.name, self.zca.fingerprint, self.zca_regularization)
        return InputSpace.meanstd(real.name, real.mean, real.std)

    # ----------------------------------------------------------------- shape facts
    @property
    def num_classes(self) -> int:
        return self._real().num_classes

    @property
    def channels(self) -> int:
        return self._real().channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self._real().image_size

    def images_of_class(
        self, c: int, n: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` random training-part images of class ``c`` (validation excluded), in input
        space: ``train_set`` rows ``randperm(count, generator)[:n]`` of that class
        (all of them, in order, when ``n`` is None)."""
        real = self._real()
        assert self.train_set is not None
        y = self.train_set.labels
        idx = draw_indices(torch.nonzero(y == real._check_class(c)).flatten(), n, generator,
                           f"{real.name}: asked for {n} images of class {c} but the training part")
        return self.train_set.images(idx)

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """The training order's generator states (Lightning keeps a datamodule's state in
        its checkpoints), so that a fit resumed at epoch e draws epoch e's batches."""
        return {"train_order": [g.get_state() for g in self._order_generators]} \
            if self._order_generators else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give the training order's generators the saved states: now, if the loaders
        exist already (a group's member loaders), else when they are made."""
        states = list(state_dict.get("train_order") or [])
        if states and len(states) == len(self._order_generators):
            for g, st in zip(self._order_generators, states, strict=True):
                g.set_state(st)
        else:
            self._order_resume = states or None

    def _order_generator(self, seeds: list[int]) -> list[torch.Generator]:
        """Fresh generators of the training order (seeded, or in a resumed fit's saved
        states), remembered for :meth:`state_dict`."""
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if self._order_resume is not None and len(self._order_resume) == len(gens):
            for g, st in zip(gens, self._order_resume, strict=True):
                g.set_state(st)
            self._order_resume = None
        self._order_generators = gens
        return gens

    # ------------------------------------------------------------------ loaders
    def _batched(self, split: HeldSplit | StreamedSplit, shuffle: bool,
                 generator: torch.Generator | None, indices: Tensor | None = None
                 ) -> TensorBatchLoader:
        """The ``"batched"`` loader of a split: gathered float32 rows of a held one, uint8
        codes of a streamed one (:class:`SplitBatchLoader`); the same order either way."""
        if isinstance(split, StreamedSplit):
            return SplitBatchLoader(split, self.batch_size, shuffle=shuffle,
                                    generator=generator, indices=indices)
        x, y = split.tensors
        return TensorBatchLoader(x, y, self.batch_size, shuffle=shuffle, generator=generator,
                                 indices=indices)

    def _dataloader(self, dataset: Any, shuffle: bool, generator: torch.Generator | None,
                    persistent: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=persistent and self.num_workers > 0,
            # a streamed split's uint8 batches go to the GPU through page-locked memory
            pin_memory=torch.cuda.is_available() and not getattr(dataset, "held", True),
        )

    def _loader(
        self, dataset: HeldSplit | StreamedSplit | None, shuffle: bool
    ) -> DataLoader | TensorBatchLoader:
        if dataset is None:
            raise StateError("RealDataModule: call setup() first")
        generator = self._order_generator(
            [self.split_seed if self.shuffle_seed is None else self.shuffle_seed]
        )[0] if shuffle else None
        if self.loader == "batched":
            return self._batched(dataset, shuffle, generator)
        return self._dataloader(dataset, shuffle, generator, persistent=True)

    #: A LightningModule with ``owns_train_loader = True`` (the DistillationModule, whose
    #: training steps are outer iterations, not real batches) gets its own
    #: ``train_dataloader()`` from :meth:`train_dataloader`.
    defers_train_loader = True

    def train_dataloader(self) -> Any:
        """Shuffled training batches; the order is seeded by ``shuffle_seed`` (or ``split_seed``),
        a fresh generator per call (the same order for every new loader). With
        :attr:`train_selection` set: the current epoch's subset (see the class docstring).

        When the Trainer's LightningModule declares ``owns_train_loader = True`` (the
        DistillationModule), its own ``train_dataloader()`` instead: its steps are outer
        iterations, and this data module supplies the real data of its initialisation
        (``train_set``) and of the validation callbacks (``val_set``)."""
        trainer = self.trainer
        model = getattr(trainer, "lightning_module", None)
        if isinstance(model, OwnsTrainLoader) and model.owns_train_loader:
            return model.train_dataloader()
        if self.train_selection is None:
            return self._loader(self.train_set, shuffle=True)
        return self._selected_loader()

    def selected_indices(self, epoch: int) -> Tensor:
        """``train_selection(epoch)`` as a checked int64 CPU tensor (indices into ``train_set``)."""
        if self.train_selection is None:
            raise StateError("RealDataModule.selected_indices: train_selection is not set")
        if self.train_set is None:
            raise StateError("RealDataModule: call setup() first")
        n = len(self.train_set)
        idx = torch.as_tensor(self.train_selection(int(epoch)), dtype=torch.long).flatten().cpu()
        if idx.numel() == 0:
            raise InputError(
                f"RealDataModule: the data selection keeps no training sample at epoch {epoch} "
                f"(of {n}); raise its ratios or use a larger training split"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise InputError(f"RealDataModule: selected indices must lie in [0, {n})")
        return idx

    def _selected_loader(self) -> DataLoader | TensorBatchLoader:
        from lightning_distill.seeding import derive_seed

        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        idx = self.selected_indices(epoch)
        base = self.split_seed if self.shuffle_seed is None else self.shuffle_seed
        generator = torch.Generator().manual_seed(derive_seed(base, epoch))
        assert self.train_set is not None
        if self.loader == "batched":
            return self._batched(self.train_set, True, generator, indices=idx)
        # a new loader (and workers) every epoch
        return self._dataloader(Subset(self.train_set, idx.tolist()), True, generator,
                                persistent=False)

    def member_train_dataloader(self, shuffle_seeds: list[int]) -> MemberBatches:
        """Training batches for a group of K members: member k's order is exactly that of
        ``train_dataloader()`` with ``shuffle_seed = shuffle_seeds[k]`` under the
        ``"batched"`` loader (:class:`TensorBatchLoader`, which also shards under
        ``torch.distributed``), stacked to ``[K, B, ...]`` (:class:`MemberBatches`)."""
        if self.train_set is None:
            raise StateError("RealDataModule: call setup() first")
        return MemberBatches([self._batched(self.train_set, True, g)
                              for g in self._order_generator(list(shuffle_seeds))])

    def val_dataloader(self) -> DataLoader | TensorBatchLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader | TensorBatchLoader:
        return self._loader(self.test_set, shuffle=False)
