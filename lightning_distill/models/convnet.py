"""ConvNet, the distillation network of DC/DSA/MTT/FTD/DATM (docs/method.md, section 'Networks').

Per block d = 0..D-1::

    Conv2d(in, width, 3, padding=1, bias) -> norm -> act -> pool

then ``Flatten -> Linear(width * h * w, num_classes)``. For 28x28 inputs (MNIST,
Fashion-MNIST) the first conv uses padding 3, so the maps go 32 -> 16 -> 8 -> 4.
With the defaults, CIFAR-10 ConvNet-3 (3x32x32, 10 classes) has 320,010 parameters.

``named_parameters()`` order: ``features.{d}.conv.weight``, ``features.{d}.conv.bias``,
``features.{d}.norm.weight``, ``features.{d}.norm.bias`` per block, then
``classifier.weight``, ``classifier.bias``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError
from .pooling import AvgPool2x2
from .registry import register_model, to_hw

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "POOLINGS",
    "ConvBlock",
    "ConvNet",
    "ConvNetBN",
    "ConvNetD4",
    "ConvNetD5",
    "make_act",
    "make_norm",
]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
POOLINGS = ("avgpooling", "maxpooling", "none")


def _check_choice(field: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"models: unknown {field} {value!r}; choose one of {list(choices)}")
    return value


def make_norm(norm: str, channels: int, shape: tuple[int, int] | None = None) -> nn.Module:
    """Normalisation layer for ``channels`` feature maps (of spatial ``shape`` for layernorm).

    instancenorm = GroupNorm(C, C, affine=True) (per-sample, per-channel, no running stats);
    batchnorm = BatchNorm2d(C); layernorm = LayerNorm([C, H, W]) (elementwise affine);
    groupnorm = GroupNorm(4, C); none = Identity.
    """
    _check_choice("norm", norm, NORMS)
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        if shape is None:
            raise InputError("models: norm 'layernorm' needs the feature map shape")
        return nn.LayerNorm([channels, *shape], elementwise_affine=True)
    if norm == "groupnorm":
        if channels % 4:
            raise InputError(
                f"models: norm 'groupnorm' uses 4 groups and needs channels divisible by 4, "
                f"got {channels}; change the width"
            )
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


def make_act(act: str) -> nn.Module:
    """relu, sigmoid or leakyrelu (negative slope 0.01); never in place (safe to unroll)."""
    _check_choice("act", act, ACTIVATIONS)
    if act == "relu":
        return nn.ReLU()
    if act == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


class ConvBlock(nn.Module):
    """conv -> norm -> act -> pool (attribute order fixes the parameter order)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module, pool: nn.Module):
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.act = act
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


@register_model
class ConvNet(nn.Module):
    """ConvNet-D of DC/DSA/MTT (Zhao et al., ICLR 2021; docs/method.md, section 'Networks').

    Args:
        channels: input channels.
        num_classes: output logits.
        image_size: int or (H, W) of the input.
        width: conv channels per block (128).
        depth: number of blocks D (3 for 32 px, 4 for 64 px, 5 for 128 px).
        norm: one of ``NORMS``.
        act: one of ``ACTIVATIONS``.
        pooling: one of ``POOLINGS`` (2x2, stride 2; the average pool is
            :class:`~lightning_distill.models.pooling.AvgPool2x2`).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int | Sequence[int],
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pooling: str = "avgpooling",
    ):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        _check_choice("act", act, ACTIVATIONS)
        _check_choice("pooling", pooling, POOLINGS)
        if depth < 1 or width < 1:
            raise InputError(f"ConvNet: depth and width must be >= 1, got {depth}, {width}")
        h, w = hw = to_hw(image_size)
        blocks = []
        in_ch = channels
        for d in range(depth):
            pad = 3 if d == 0 and hw == (28, 28) else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            conv = nn.Conv2d(in_ch, width, kernel_size=3, padding=pad, bias=True)
            norm_layer = make_norm(norm, width, (h, w))
            if pooling == "none":
                pool: nn.Module = nn.Identity()
            else:
                if min(h, w) < 2:
                    raise InputError(
                        f"ConvNet: image_size {hw} is too small for depth {depth} "
                        f"(block {d} would pool a {h}x{w} map); use a smaller depth"
                    )
                pool = AvgPool2x2() if pooling == "avgpooling" else nn.MaxPool2d(2, 2)
                h, w = h // 2, w // 2
            blocks.append(ConvBlock(conv, norm_layer, make_act(act), pool))
            in_ch = width
        self.features = nn.Sequential(*blocks)
        self.feature_shape = (width, h, w)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features before the classifier, [B, width * h * w]."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@register_model
class ConvNetD4(ConvNet):
    """ConvNet with depth 4 (64 px inputs, e.g. Tiny ImageNet)."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 width: int = 128, norm: str = "instancenorm", act: str = "relu",
                 pooling: str = "avgpooling"):
        super().__init__(channels, num_classes, image_size, width, 4, norm, act, pooling)


@register_model
class ConvNetD5(ConvNet):
    """ConvNet with depth 5 (128 px inputs)."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 width: int = 128, norm: str = "instancenorm", act: str = "relu",
                 pooling: str = "avgpooling"):
        super().__init__(channels, num_classes, image_size, width, 5, norm, act, pooling)


@register_model
class ConvNetBN(ConvNet):
    """ConvNet with BatchNorm2d (has running statistics)."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 width: int = 128, depth: int = 3, act: str = "relu",
                 pooling: str = "avgpooling"):
        super().__init__(channels, num_classes, image_size, width, depth, "batchnorm", act,
                         pooling)
