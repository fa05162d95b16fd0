"""A split of a real data set in the model's input space: held whole, or read per batch.

:class:`RealDataModule` gives each split (train part, validation part, test) as one of:

- :class:`HeldSplit`: a ``TensorDataset`` of float32 input-space images and int64 labels,
  transformed once (the small data sets: digits, Fashion-MNIST, CIFAR);
- :class:`StreamedSplit`: the int64 labels in memory and the images as the data set's
  uint8 codes (in memory, or a prepared split read by rows from disk:
  :mod:`lightning_distill.data.prepared`), gathered per batch and transformed on
  access, on the device the batch is on.

Both answer the same questions: ``len``, ``labels``, ``images(index)`` (input space),
``batches(batch_size)`` (in order) and, as a ``Dataset``, ``split[i]``. Only a held split
has ``tensors``; a streamed one refuses, naming the way to read it. The transform of a
streamed split, ``to_input_space(codes.to(float32) / pixel_scale)``, is the held split's
own, so on one device both give the same floats bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..artifacts import TensorChunks
from ..errors import StateError

__all__ = ["HASH_CHUNK_ROWS", "HeldSplit", "SplitImages", "StreamedSplit", "images_hash_part",
           "images_view", "split_labels"]

#: rows per chunk when a streamed split's images are read whole in order (hashing): the
#: chunk the RealDataModule transforms a held split in, so both see the same blocks
HASH_CHUNK_ROWS = 4096


class HeldSplit(TensorDataset):
    """A split held as float32 input-space images and int64 labels (``tensors``)."""

    held = True

    @property
    def labels(self) -> Tensor:
        return self.tensors[1]

    def images(self, index: Tensor | Sequence[int] | slice) -> Tensor:
        """Input-space images of rows ``index`` (a view for a slice)."""
        x = self.tensors[0]
        return x[index] if isinstance(index, slice) else x[torch.as_tensor(index, dtype=torch.long)]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.tensors
        for i in range(0, len(self), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]


class StreamedSplit(Dataset):
    """Rows ``rows`` of uint8 codes ``[N, C, H, W]``, transformed per access.

    Args:
        codes: the data set's uint8 codes of this split (a tensor, possibly over a memory
            map: only the rows gathered are read).
        labels: int64 labels of every row of ``codes``.
        rows: int64 rows of ``codes`` that form this split (validation / train parts).
        to_input: ``codes -> float32 input-space images`` on the codes' device
            (:meth:`RealDataModule.codes_to_input`).

    ``rows_read`` counts the rows gathered so far (a rank's share under DDP is what it
    reads).
    """

    held = False

    def __init__(self, codes: Tensor, labels: Tensor, rows: Tensor,
                 to_input: Callable[[Tensor], Tensor]) -> None:
        self.codes = codes
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.labels = labels[self.rows].clone()
        self.to_input = to_input
        self.rows_read = 0

    def __len__(self) -> int:
        return int(self.rows.numel())

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.codes.shape[1:])

    @property
    def tensors(self) -> Any:
        raise StateError(
            f"this split of {len(self)} images is streamed, not held (data.hold: false or "
            "a split over the hold limit): read it with .images(index) or .batches(n), or "
            "set data.hold: true to hold it as float32")

    def _index(self, index: Tensor | Sequence[int] | slice) -> Tensor:
        if isinstance(index, slice):
            return self.rows[index]
        return self.rows[torch.as_tensor(index, dtype=torch.long)]

    def codes_of(self, index: Tensor | Sequence[int] | slice) -> Tensor:
        """uint8 codes of the split's rows ``index`` (read from the map now)."""
        rows = self._index(index)
        self.rows_read += int(rows.numel())
        return self.codes.index_select(0, rows)

    def images(self, index: Tensor | Sequence[int] | slice) -> Tensor:
        """float32 input-space images of the split's rows ``index``."""
        return self.to_input(self.codes_of(index))

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            s = slice(i, i + batch_size)
            yield self.images(s), self.labels[s]

    # -- as a map-style Dataset of uint8 codes (a DataLoader with workers; the
    #    RealDataModule transforms each batch after its transfer to the device)
    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.codes_of([int(i)])[0], self.labels[int(i)]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        codes = self.codes_of(idx)
        labels = self.labels[idx]
        return [(codes[j], labels[j]) for j in range(idx.numel())]


class SplitImages:
    """A streamed split's images as an indexable: ``view[index]`` reads and transforms
    rows ``index`` only (a CPU float32 tensor); ``shape`` is the split's ``[n, C, H, W]``.

    It answers what the evaluation loops ask of an images tensor (``shape``, ``dim()``,
    ``dtype``, ``device``, ``len``, indexing by a slice or an int64 index), so they read
    it a batch at a time (:func:`~lightning_distill.functional.evaluation.train_and_evaluate`
    and the test passes gather each batch's rows)."""

    dtype = torch.float32

    def __init__(self, split: StreamedSplit) -> None:
        self.split = split

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.split), *self.split.image_shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    @property
    def device(self) -> torch.device:
        """Where the rows are read and transformed (the codes' device: the CPU)."""
        return self.split.codes.device

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Tensor | Sequence[int] | slice) -> Tensor:
        return self.split.images(index)

    def chunks(self, rows: int | None = None) -> Iterator[Tensor]:
        """All images in order, ``rows`` (default :data:`HASH_CHUNK_ROWS`) at a time."""
        rows = HASH_CHUNK_ROWS if rows is None else int(rows)
        for i in range(0, len(self.split), rows):
            yield self.split.images(slice(i, i + rows))

    def __repr__(self) -> str:
        return f"SplitImages(shape={tuple(self.shape)}, streamed)"


def images_view(split: Any) -> Tensor | SplitImages:
    """A split's images, indexable by rows: the tensor of a held split (or a user's
    ``TensorDataset``), a :class:`SplitImages` of a streamed one."""
    return SplitImages(split) if isinstance(split, StreamedSplit) else split.tensors[0]


def images_hash_part(split: Any) -> Tensor | TensorChunks:
    """A split's input-space images as a part of :func:`~lightning_distill.artifacts.sha256`:
    the tensor of a held split; for a streamed one a :class:`TensorChunks` read in order
    :data:`HASH_CHUNK_ROWS` rows at a time, whose digest is that of the same split held
    (the same float32 images, dtype and shape), without holding it."""
    view = images_view(split)
    if isinstance(view, Tensor):
        return view
    return TensorChunks(torch.float32, tuple(view.shape), view.chunks)


def split_labels(split: Any) -> Tensor:
    """A split's int64 labels (a held or streamed split, or a user's ``TensorDataset``)."""
    return split.labels if hasattr(split, "labels") else split.tensors[1]
