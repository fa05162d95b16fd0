"""VGG11 of the DC/DSA benchmark (cross-architecture nets; docs/method.md,
section 'Networks').

cfg ``64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M``; each number is
``Conv2d(in, c, 3, padding=1) -> norm -> ReLU`` (padding 3 on the first conv for 28x28
input), each ``M`` a 2x2 max-pool. Norm "instancenorm" = GroupNorm(C, C, affine=True).
Pools that would shrink the map below 1x1 are skipped (small inputs, e.g. 8x8 digits),
and the linear classifier is sized from the actual feature map (512 for 32 px).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import InputError
from .alexnet import ConvFeaturesLinear
from .convnet import _check_choice, make_norm
from .registry import register_model, to_hw

__all__ = ["VGG", "VGG11", "VGG11BN", "VGG_CFGS"]

VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "VGG11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}

_VGG_NORMS = ("instancenorm", "batchnorm", "none")


class VGG(ConvFeaturesLinear):
    """VGG from a cfg of conv widths and ``"M"`` (max-pool) entries."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int | Sequence[int],
        cfg: Sequence[int | str] = VGG_CFGS["VGG11"],
        norm: str = "instancenorm",
    ):
        super().__init__()
        _check_choice("norm", norm, _VGG_NORMS)
        hw = to_hw(image_size)
        h, w = hw
        layers: list[nn.Module] = []
        in_ch = channels
        first = True
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
                continue
            if isinstance(v, str) or int(v) < 1:
                raise InputError(f"VGG: cfg entries must be positive ints or 'M', got {v!r}")
            pad = 3 if first and hw == (28, 28) else 1
            first = False
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=pad), make_norm(norm, int(v)),
                       nn.ReLU()]
            in_ch = int(v)
        self._set_head(layers, (in_ch, h, w), num_classes)


@register_model
class VGG11(VGG):
    """VGG11 with instance norm (GroupNorm(C, C)) by default."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 norm: str = "instancenorm"):
        super().__init__(channels, num_classes, image_size, VGG_CFGS["VGG11"], norm)


@register_model
class VGG11BN(VGG):
    """VGG11 with BatchNorm2d."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int]):
        super().__init__(channels, num_classes, image_size, VGG_CFGS["VGG11"], "batchnorm")
