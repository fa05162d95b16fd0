"""ZCA whitening of images (docs/method.md, section 'ZCA whitening and normalisation').

The transform of MTT's CIFAR experiments and of every DATM configuration.

Images in [0, 1] are flattened to X [N, D] (D = C*H*W). Fit:

    mu = mean_n X[n]                         (per-feature mean)
    S  = (X - mu)^T (X - mu) / (N - 1)       (unbiased covariance, float64, in chunks)
    S  = U diag(s) U^T                       (torch.linalg.eigh)
    W     = U diag((s + reg)^-1/2) U^T
    W_inv = U diag((s + reg)^+1/2) U^T

transform(x) = (x_flat - mu) W and inverse(z) = z W_inv + mu, reshaped to the input shape.
The whitened training covariance is W S W = U diag(s / (s + reg)) U^T.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..artifacts import sha256
from ..errors import InputError, StateError

__all__ = ["ZCA"]

_FORMAT_VERSION = 1


#: rows per matrix product in :meth:`ZCA.transform` / :meth:`ZCA.inverse`: every row goes
#: through a product of this many rows (the last block padded with zeros), so that a row's
#: result does not depend on how many rows are transformed with it. A BLAS picks other
#: kernels, which sum in another order, for a product of a few rows (MKL on an AMD EPYC:
#: 1 to 6 rows differ from the same rows inside a larger product), and the streamed
#: splits whiten a batch, or the few rows of an initialisation, where a held split
#: whitens everything at once; both must agree bit for bit.
ROW_BLOCK = 64


def _times(rows: Tensor, w: Tensor) -> Tensor:
    """``rows @ w`` in blocks of :data:`ROW_BLOCK` rows (differentiable)."""
    n = rows.shape[0]
    if n == 0:
        return rows @ w
    pad = -n % ROW_BLOCK
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    if torch.is_grad_enabled() and (rows.requires_grad or w.requires_grad):
        return torch.cat([block @ w for block in rows.split(ROW_BLOCK)])[:n]
    out = rows.new_empty(rows.shape[0], w.shape[1])  # no second copy of a whole split
    for i in range(0, rows.shape[0], ROW_BLOCK):
        torch.mm(rows[i:i + ROW_BLOCK], w, out=out[i:i + ROW_BLOCK])
    return out[:n]


class ZCA:
    """ZCA whitening fitted on a training set of images [N, C, H, W].

    Args:
        regularization: ``reg`` added to the covariance eigenvalues (0.1 in MTT/DATM).
        chunk_size: rows of X converted to float64 at a time while fitting, which bounds
            the extra memory of ``fit`` to ``chunk_size * D`` doubles plus the D x D
            covariance.

    Master copies (mean, eigenvalues, W, W_inv) are float64 on the CPU;
    float32 (or float64 for float64 inputs) copies are cached per device. Outputs have the
    input's dtype and device; half-precision inputs are computed in float32.
    """

    def __init__(self, regularization: float = 0.1, *, chunk_size: int = 4096) -> None:
        if regularization < 0:
            raise InputError(f"ZCA regularization must be >= 0, got {regularization}")
        if chunk_size < 1:
            raise InputError(f"ZCA chunk_size must be >= 1, got {chunk_size}")
        self.regularization = float(regularization)
        self.chunk_size = int(chunk_size)
        self._shape: tuple[int, ...] | None = None
        self._mean: Tensor | None = None
        self._eigenvalues: Tensor | None = None
        self._whiten: Tensor | None = None
        self._unwhiten: Tensor | None = None
        self._num_samples = 0
        self._reset_cache()

    # ------------------------------------------------------------------ state
    def _reset_cache(self) -> None:
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}
        self._fingerprint: str | None = None

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` or :meth:`load_state_dict` has run."""
        return self._mean is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """Image shape [C, H, W] the transform was fitted on."""
        self._require_fitted()
        assert self._shape is not None
        return self._shape

    @property
    def eigenvalues(self) -> Tensor | None:
        """Covariance eigenvalues s (float64, ascending; None if loaded without them)."""
        self._require_fitted()
        return self._eigenvalues

    @property
    def mean(self) -> Tensor:
        """Per-feature mean mu (float64 [D])."""
        self._require_fitted()
        assert self._mean is not None
        return self._mean

    @property
    def whitening_matrix(self) -> Tensor:
        """W = U diag((s + reg)^-1/2) U^T (float64 [D, D])."""
        self._require_fitted()
        assert self._whiten is not None
        return self._whiten

    @property
    def inverse_matrix(self) -> Tensor:
        """W_inv = U diag((s + reg)^1/2) U^T (float64 [D, D])."""
        self._require_fitted()
        assert self._unwhiten is not None
        return self._unwhiten

    @property
    def fingerprint(self) -> str:
        """Short stable id of the fitted transform: sha256 of shape, reg, mean and W bytes.

        Computed from the float64 mean and whitening matrix held in memory; :meth:`save`
        stores W itself, so a saved and reloaded transform has the same fingerprint.
        """
        self._require_fitted()
        if self._fingerprint is None:
            # bytes, not tensors: the digest of the first version (stores and sets record it)
            self._fingerprint = sha256(repr((tuple(self.shape), self.regularization)),
                                       self.mean.numpy().tobytes(),
                                       self.whitening_matrix.numpy().tobytes(), length=16)
        return self._fingerprint

    def state_dict(self) -> dict:
        """Everything needed to rebuild the transform exactly (tensors are float64, CPU).

        W and W_inv are stored themselves (not re-derived on load) so that a reloaded
        transform gives bit-identical outputs and the same fingerprint.
        """
        self._require_fitted()
        return {
            "format_version": _FORMAT_VERSION,
            "regularization": self.regularization,
            "shape": list(self.shape),
            "num_samples": self._num_samples,
            "mean": self._mean,
            "eigenvalues": self._eigenvalues,
            "whiten": self._whiten,
            "unwhiten": self._unwhiten,
        }

    def load_state_dict(self, state: dict) -> ZCA:
        """Restore a transform saved by :meth:`state_dict`; returns self."""
        required = ("regularization", "shape", "mean", "whiten", "unwhiten")
        missing = [k for k in required if k not in state]
        if missing:
            raise InputError(f"ZCA state dict is missing {missing}; was it saved by ZCA.save?")
        version = int(state.get("format_version", _FORMAT_VERSION))
        if version > _FORMAT_VERSION:
            raise InputError(
                f"ZCA state format_version {version} is newer than supported "
                f"({_FORMAT_VERSION}); upgrade lightning_distill"
            )
        shape = tuple(int(v) for v in state["shape"])
        d = 1
        for v in shape:
            d *= v

        def f64(key: str, expected: tuple[int, ...]) -> Tensor:
            t = torch.as_tensor(state[key]).detach().to("cpu", torch.float64).contiguous()
            if tuple(t.shape) != expected:
                raise InputError(
                    f"ZCA state field {key!r} has shape {list(t.shape)}, expected {list(expected)}"
                )
            return t

        self.regularization = float(state["regularization"])
        self._shape = shape
        self._num_samples = int(state.get("num_samples", 0))
        self._mean = f64("mean", (d,))
        self._eigenvalues = f64("eigenvalues", (d,)) if "eigenvalues" in state else None
        self._whiten = f64("whiten", (d, d))
        self._unwhiten = f64("unwhiten", (d, d))
        self._reset_cache()
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state dict to ``path`` atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZCA:
        """Load a transform written by :meth:`save`."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(float(state.get("regularization", 0.1))).load_state_dict(state)

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, x: Tensor) -> ZCA:
        """Fit on training images ``x`` [N, C, H, W] (values in [0, 1]); returns self.

        Two passes over ``x`` in chunks of ``chunk_size`` rows, each converted to float64
        on ``x.device``: the mean, then S = sum_chunks Xc^T Xc / (N - 1).
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"ZCA.fit expects training images [N, C, H, W], got {shape}")
        n = int(x.shape[0])
        if n < 2:
            raise InputError(f"ZCA.fit needs at least 2 images for a covariance, got {n}")
        shape = tuple(int(v) for v in x.shape[1:])
        flat = x.detach().reshape(n, -1)
        d = flat.shape[1]
        cs = self.chunk_size
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for i in range(0, n, cs):
            total += flat[i : i + cs].to(torch.float64).sum(dim=0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for i in range(0, n, cs):
            xc = flat[i : i + cs].to(torch.float64) - mean
            cov.addmm_(xc.T, xc)
            del xc
        cov /= n - 1
        cov = 0.5 * (cov + cov.T)
        s, u = torch.linalg.eigh(cov)
        del cov
        shifted = s + self.regularization
        if bool((shifted <= 0).any()):
            raise InputError(
                "ZCA.fit: covariance eigenvalue + regularization is not positive; "
                "use regularization > 0 for rank-deficient data"
            )
        self._shape = shape
        self._num_samples = n
        self._mean = mean.cpu()
        self._eigenvalues = s.cpu()
        self._whiten = ((u * shifted.rsqrt()) @ u.T).cpu().contiguous()
        self._unwhiten = ((u * shifted.sqrt()) @ u.T).cpu().contiguous()
        self._reset_cache()
        return self

    # ------------------------------------------------------------------ applying
    def _require_fitted(self) -> None:
        if self._mean is None:
            raise StateError("ZCA is not fitted: call fit(train_images) or ZCA.load(path) first")

    def _flatten(self, x: Tensor, what: str) -> Tensor:
        self._require_fitted()
        assert self._shape is not None
        k = len(self._shape)
        if not isinstance(x, Tensor) or x.dim() < k or tuple(x.shape[-k:]) != self._shape:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"ZCA.{what}: expected images of shape [..., {', '.join(map(str, self._shape))}]"
                f" (the [C,H,W] it was fitted on), got {got}"
            )
        return x.reshape(-1, self._mean.numel())  # type: ignore[union-attr]

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            assert self._whiten is not None and self._unwhiten is not None
            self._cache[key] = (
                self._mean.to(device, dtype),  # type: ignore[union-attr]
                self._whiten.to(device, dtype),
                self._unwhiten.to(device, dtype),
            )
        return self._cache[key]

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def transform(self, x: Tensor) -> Tensor:
        """Whiten: (x_flat - mu) W, reshaped to ``x.shape``; differentiable w.r.t. ``x``."""
        flat = self._flatten(x, "transform")
        ct = self._compute_dtype(x)
        mu, w, _ = self._matrices(x.device, ct)
        out = _times(flat.to(ct) - mu, w)
        return out.reshape(x.shape).to(x.dtype if x.is_floating_point() else ct)

    def inverse(self, z: Tensor) -> Tensor:
        """Un-whiten: z_flat W_inv + mu, reshaped to ``z.shape``; differentiable."""
        flat = self._flatten(z, "inverse")
        ct = self._compute_dtype(z)
        mu, _, w_inv = self._matrices(z.device, ct)
        out = _times(flat.to(ct), w_inv) + mu
        return out.reshape(z.shape).to(z.dtype if z.is_floating_point() else ct)

    __call__ = transform

    def __repr__(self) -> str:
        if not self.fitted:
            return f"ZCA(regularization={self.regularization}, fitted=False)"
        return (
            f"ZCA(regularization={self.regularization}, shape={list(self.shape)}, "
            f"num_samples={self._num_samples}, fingerprint={self.fingerprint!r})"
        )
