"""Differentiable Siamese Augmentation (DSA): docs/method.md, section 'Differentiable siamese
augmentation'.

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (ICML 2021),
as used by MTT / FTD / DATM. Each call picks ONE family at random from the strategy and
applies it to the whole batch with independent per-sample parameters. Sampling and
application are separate (``sample`` -> :class:`DSAParams`, ``apply``), so a step can be
replayed bit for bit (the "Siamese" part: the same parameters can be applied to several
batches, and a recomputed inner step sees exactly the same augmentation).

Families and parameter ranges (u ~ U[0, 1] per sample):

- ``scale``: sx, sy ~ U[1/scale, scale] independently; affine grid + ``grid_sample``
  (bilinear, zero padding, ``align_corners=True``) with theta = [[sx, 0, 0], [0, sy, 0]].
- ``rotate``: angle ~ U[-rotate, rotate] degrees; theta = [[cos, -sin, 0], [sin, cos, 0]].
- ``flip``: horizontal flip with probability 0.5 per sample.
- ``color`` = ``brightness`` then ``saturation`` then ``contrast``:
  brightness x + (u - 0.5) * brightness;
  saturation (x - m) * (saturation * u) + m with m the mean over channels;
  contrast (x - m) * (u + contrast) + m with m the mean over C, H, W.
- ``crop``: integer shifts dy, dx in [-round(crop * H), round(crop * H)] (rows) and
  [-round(crop * W), round(crop * W)] (columns); ``out[r, c] = x[r + dy, c + dx]``,
  zero outside the image.
- ``cutout``: a round(cutout * H) x round(cutout * W) rectangle zeroed around a centre
  (cy, cx) drawn uniformly over the image (cy in [0, H] for an even size, [0, H - 1] for
  an odd one, so the square may stick out of the image); rows
  [cy - size // 2, cy - size // 2 + size).

``brightness``, ``saturation`` and ``contrast`` are also accepted as families on their own.
Every operation is affine in the pixels for fixed parameters, hence differentiable (no
in-place writes into the input). Flip must be dropped for digit data sets (MNIST, sklearn
digits, SVHN): a mirrored digit is a different (or no) digit; use ``flip=False``,
:func:`dsa_flip_for` or :meth:`DSA.for_dataset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, InputTypeError
from ..functional.device import to_device

__all__ = [
    "DEFAULT_DSA_STRATEGY",
    "DSA",
    "DSAParams",
    "FAMILIES",
    "ResumableGenerator",
    "dsa_flip_for",
    "make_dsa",
    "protocol_dsa",
]

#: the strategy of MTT, FTD and DATM: one of these families per call
DEFAULT_DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

#: every family name accepted in a strategy string
FAMILIES: tuple[str, ...] = (
    "color",
    "brightness",
    "saturation",
    "contrast",
    "crop",
    "cutout",
    "flip",
    "scale",
    "rotate",
)
_IDENTITY = "none"


@dataclass(frozen=True)
class DSAParams:
    """Sampled parameters of one DSA call: the family and its per-sample tensors.

    ``tensors`` keys by family: scale ``sx``, ``sy`` [N]; rotate ``degrees`` [N];
    flip ``mask`` (bool [N]); color ``brightness`` (additive offset), ``saturation`` and
    ``contrast`` (multiplicative factors) [N]; crop ``shift`` (int64 [N, 2], (dy, dx));
    cutout ``center`` (int64 [N, 2], (cy, cx)). Family ``"none"`` has no tensors.
    """

    family: str
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> DSAParams:
        """Return a copy with every tensor on ``device`` (:func:`to_device`: CPU -> CUDA
        through pinned memory, without synchronising the GPU)."""
        return DSAParams(self.family,
                         {k: to_device(v, device) for k, v in self.tensors.items()})

    @property
    def batch_size(self) -> int | None:
        """Number of samples the parameters were drawn for (None for the identity)."""
        for v in self.tensors.values():
            return int(v.shape[0])
        return None


def _parse_strategy(strategy: str, flip: bool) -> tuple[str, ...]:
    if not isinstance(strategy, str):
        raise InputTypeError(f"DSA strategy must be a string, got {type(strategy).__name__}")
    s = strategy.strip().lower()
    if s in ("", _IDENTITY):
        return ()
    families = tuple(p for p in s.split("_") if p)
    unknown = [p for p in families if p not in FAMILIES]
    if unknown:
        raise InputError(
            f"DSA strategy {strategy!r}: unknown augmentation family {unknown[0]!r}; "
            f"use families from {list(FAMILIES)} joined by '_' (or 'none')"
        )
    if not flip:
        families = tuple(p for p in families if p != "flip")
    return families


class DSA:
    """Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

    Args:
        strategy: families joined by ``"_"`` (``"color"`` counts as one family);
            ``""`` or ``"none"`` is the identity.
        flip: keep the ``flip`` family; set False for digit data sets (MNIST, digits).
        scale: scale factors are drawn from U[1/scale, scale].
        rotate: maximum rotation in degrees.
        brightness: width of the additive brightness offset range (centred at 0).
        saturation: saturation factor is ``saturation * u``.
        contrast: contrast factor is ``u + contrast``.
        crop: maximum shift as a fraction of the image side.
        cutout: side of the cut-out square as a fraction of the image side.

    ``dsa(x, generator)`` equals ``dsa.apply(x, dsa.sample(x, generator))``.
    """

    def __init__(
        self,
        strategy: str = DEFAULT_DSA_STRATEGY,
        *,
        flip: bool = True,
        scale: float = 1.2,
        rotate: float = 15.0,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        crop: float = 0.125,
        cutout: float = 0.5,
    ) -> None:
        if scale < 1.0:
            raise InputError(f"DSA scale must be >= 1 (factors in [1/scale, scale]), got {scale}")
        for name, value in (("crop", crop), ("cutout", cutout)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"DSA {name} must be a fraction in [0, 1], got {value}")
        self.strategy = strategy
        self.flip = bool(flip)
        self.scale = float(scale)
        self.rotate = float(rotate)
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)
        self.crop = float(crop)
        self.cutout = float(cutout)
        self.families: tuple[str, ...] = _parse_strategy(strategy, self.flip)

    @classmethod
    def for_dataset(cls, name: str, strategy: str = DEFAULT_DSA_STRATEGY, **kwargs) -> DSA:
        """DSA with the DC/DSA convention for data set ``name``: flip as :func:`dsa_flip_for`
        says (an explicit ``flip=`` keyword wins)."""
        kwargs.setdefault("flip", dsa_flip_for(name))
        return cls(strategy, **kwargs)

    @property
    def is_identity(self) -> bool:
        """True when the strategy has no family (every call returns its input)."""
        return not self.families

    def __repr__(self) -> str:
        return (
            f"DSA(strategy={self.strategy!r}, families={list(self.families)}, flip={self.flip}, "
            f"scale={self.scale}, rotate={self.rotate}, brightness={self.brightness}, "
            f"saturation={self.saturation}, contrast={self.contrast}, crop={self.crop}, "
            f"cutout={self.cutout})"
        )

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        family: str | None = None,
    ) -> DSAParams:
        """Draw a family (or use ``family``) and its per-sample parameters for batch ``x``.

        Random numbers come from ``generator`` (drawn on the generator's device, then moved
        to ``x.device``) or, without one, from the global RNG on ``x.device``; the family
        index itself is drawn from the CPU global RNG when no generator is given (so no
        device sync is needed). ``family`` may name any family in :data:`FAMILIES`
        (useful for tests and ablations) or ``"none"``.
        """
        _check_images(x)
        if family is None:
            if not self.families:
                return DSAParams(_IDENTITY)
            if len(self.families) == 1:
                family = self.families[0]
            else:
                if generator is None:
                    k = int(torch.randint(len(self.families), (1,)).item())
                else:
                    k = int(
                        torch.randint(
                            len(self.families), (1,), generator=generator, device=generator.device
                        ).item()
                    )
                family = self.families[k]
        elif family != _IDENTITY and family not in FAMILIES:
            raise InputError(f"DSA.sample: unknown family {family!r}; use one of {list(FAMILIES)}")
        if family == _IDENTITY:
            return DSAParams(_IDENTITY)

        n, _, h, w = x.shape
        # draw (and derive the parameters) on the generator's device, then move them to
        # the batch's in one go: pinned + non_blocking for CUDA, so a CPU generator costs
        # no GPU synchronisation (a plain host-to-device copy waits for the GPU)
        src = x.device if generator is None else generator.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=src)

        def randint(low: int, high: int, *shape: int) -> Tensor:
            return torch.randint(low, high, shape, generator=generator, device=src)

        t: dict[str, Tensor] = {}
        if family == "scale":
            lo = 1.0 / self.scale
            t["sx"] = rand(n) * (self.scale - lo) + lo
            t["sy"] = rand(n) * (self.scale - lo) + lo
        elif family == "rotate":
            t["degrees"] = (rand(n) - 0.5) * (2.0 * self.rotate)
        elif family == "flip":
            t["mask"] = rand(n) < 0.5
        elif family in ("color", "brightness", "saturation", "contrast"):
            if family in ("color", "brightness"):
                t["brightness"] = (rand(n) - 0.5) * self.brightness
            if family in ("color", "saturation"):
                t["saturation"] = rand(n) * self.saturation
            if family in ("color", "contrast"):
                t["contrast"] = rand(n) + self.contrast
        elif family == "crop":
            sy, sx = _round(self.crop * h), _round(self.crop * w)
            t["shift"] = torch.stack([randint(-sy, sy + 1, n), randint(-sx, sx + 1, n)], dim=1)
        elif family == "cutout":
            ch, cw = _round(self.cutout * h), _round(self.cutout * w)
            t["center"] = torch.stack(
                [randint(0, h + 1 - ch % 2, n), randint(0, w + 1 - cw % 2, n)], dim=1
            )
        return DSAParams(family, t).to(x.device)

    # ------------------------------------------------------------------ applying
    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply sampled ``params`` to ``x`` [N, C, H, W]; deterministic and differentiable.

        ``params`` is not modified; its tensors are moved to ``x.device`` if needed. The
        output has the dtype and device of ``x``.
        """
        _check_images(x)
        fam = params.family
        if fam == _IDENTITY:
            return x
        if fam not in FAMILIES:
            raise InputError(f"DSA.apply: unknown family {fam!r} in DSAParams")
        nb = params.batch_size
        if nb is not None and nb != x.shape[0]:
            raise InputError(
                f"DSA.apply: params were sampled for a batch of {nb} images, got {x.shape[0]}; "
                "sample new params for this batch"
            )
        t = params.tensors
        n, _, h, w = x.shape

        def param(key: str) -> Tensor:
            return t[key].to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)

        if fam in ("scale", "rotate"):
            zeros = torch.zeros(n, device=x.device, dtype=x.dtype)
            if fam == "scale":
                sx = t["sx"].to(device=x.device, dtype=x.dtype)
                sy = t["sy"].to(device=x.device, dtype=x.dtype)
                row0 = torch.stack([sx, zeros, zeros], dim=1)
                row1 = torch.stack([zeros, sy, zeros], dim=1)
            else:
                rad = t["degrees"].to(device=x.device, dtype=x.dtype) * (math.pi / 180.0)
                cos, sin = torch.cos(rad), torch.sin(rad)
                row0 = torch.stack([cos, -sin, zeros], dim=1)
                row1 = torch.stack([sin, cos, zeros], dim=1)
            theta = torch.stack([row0, row1], dim=1)
            # the sampling grid in float32 whatever the autocast (a bfloat16 grid would
            # misplace samples by up to 1/4 pixel at 32 px; docs/method.md, 'Mixed precision')
            with torch.autocast(x.device.type, enabled=False):
                dtype = torch.promote_types(x.dtype, torch.float32)
                grid = F.affine_grid(theta.to(dtype), list(x.shape), align_corners=True)
                out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)
            return out.to(x.dtype)
        if fam == "flip":
            mask = t["mask"].to(device=x.device, dtype=torch.bool).view(n, 1, 1, 1)
            return torch.where(mask, x.flip(3), x)
        if fam in ("color", "brightness", "saturation", "contrast"):
            out = x
            if "brightness" in t:
                out = out + param("brightness")
            if "saturation" in t:
                m = out.mean(dim=1, keepdim=True)
                out = (out - m) * param("saturation") + m
            if "contrast" in t:
                m = out.mean(dim=(1, 2, 3), keepdim=True)
                out = (out - m) * param("contrast") + m
            return out
        if fam == "crop":
            shift = t["shift"].to(x.device)
            # pad one zero row/column on each side; out-of-range sources clamp onto it
            xp = F.pad(x, (1, 1, 1, 1))
            rows = torch.arange(h, device=x.device).view(1, h) + shift[:, :1] + 1
            cols = torch.arange(w, device=x.device).view(1, w) + shift[:, 1:] + 1
            rows = rows.clamp(0, h + 1).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2)
            cols = cols.clamp(0, w + 1).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
            return xp.gather(2, rows).gather(3, cols)
        # cutout
        ch, cw = _round(self.cutout * h), _round(self.cutout * w)
        center = t["center"].to(x.device)
        top = (center[:, 0] - ch // 2).view(n, 1)
        left = (center[:, 1] - cw // 2).view(n, 1)
        r = torch.arange(h, device=x.device).view(1, h)
        c = torch.arange(w, device=x.device).view(1, w)
        in_r = (r >= top) & (r < top + ch)  # [N, H]
        in_c = (c >= left) & (c < left + cw)  # [N, W]
        hole = in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w)
        return x * (~hole).to(x.dtype)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample parameters for ``x`` and apply them (one random family per call)."""
        return self.apply(x, self.sample(x, generator))


def make_dsa(
    dataset: str | None,
    dsa: bool = True,
    strategy: str | None = DEFAULT_DSA_STRATEGY,
    flip: bool | None = None,
) -> DSA | None:
    """The evaluation's DSA (Zhao & Bilen, ICML 2021; docs/method.md, 'Differentiable siamese
    augmentation'), or None when ``dsa`` is False.

    ``flip=None`` follows the data set: flip is dropped for digit data sets
    (:meth:`DSA.for_dataset`) and kept otherwise (also when ``dataset`` is unknown).
    """
    if not dsa:
        return None
    strategy = strategy or DEFAULT_DSA_STRATEGY
    if flip is None:
        return DSA.for_dataset(str(dataset or ""), strategy)
    return DSA(strategy, flip=flip)


def protocol_dsa(protocol, dataset: str | None) -> DSA | None:
    """:func:`make_dsa` from the DSA settings of an
    :class:`~lightning_distill.functional.evaluation.EvalProtocol` (``dsa``,
    ``dsa_strategy``, ``dsa_flip``) for ``dataset``."""
    return make_dsa(dataset, protocol.dsa, protocol.dsa_strategy, protocol.dsa_flip)


class ResumableGenerator:
    """The DSA random stream of a module: a CPU ``torch.Generator`` seeded with ``seed``,
    created on first use, whose state goes into checkpoints.

    DSA draws its per-sample parameters (a few floats per image) from this CPU generator
    and moves them to the batch's device, where the augmentation runs. So a seed gives
    the same augmentations on every device, and a state saved on a GPU resumes on a CPU
    and the other way round.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._state: Tensor | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            gen = torch.Generator(device="cpu")
            if self._state is None:
                gen.manual_seed(self.seed)
            else:
                gen.set_state(self._state)
            self._generator = gen
        return self._generator

    def state(self) -> Tensor:
        """The current state (a CPU uint8 tensor) for a checkpoint."""
        return self.generator.get_state()

    def restore(self, state: Tensor | None) -> None:
        """Continue from ``state`` (from :meth:`state`); ``None`` restarts from ``seed``."""
        self._state = None if state is None else state.to("cpu", torch.uint8)
        self._generator = None


def dsa_flip_for(dataset: str) -> bool:
    """Whether DSA keeps the flip family for data set ``dataset``.

    A mirrored digit is another digit or none, so flip is dropped for MNIST-like
    digit/character sets (any name containing "mnist" except Fashion-MNIST), sklearn
    ``digits``, SVHN and USPS, and kept otherwise (docs/method.md, section
    'Differentiable siamese augmentation').
    """
    n = str(dataset).lower().replace("-", "_")
    digits = ("mnist" in n and "fashion" not in n) or n in ("digits", "svhn", "usps")
    return not digits


def _round(v: float) -> int:
    """Round half up (the DSA convention ``int(v + 0.5)``) for non-negative ``v``."""
    return int(v + 0.5)


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"DSA expects a batch of images [N, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise InputError(f"DSA expects floating-point images, got dtype {x.dtype}")
