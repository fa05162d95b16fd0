"""ResNet18 variants of the DC/DSA benchmark (cross-architecture nets;
docs/method.md, section 'Networks').

BasicBlock ``[2, 2, 2, 2]`` with widths 64, 128, 256, 512; stem = 3x3 conv, stride 1,
64 channels -> norm -> ReLU (no max-pool). A block computes
``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))`` with a 1x1 conv + norm
shortcut when the shape changes. Head: adaptive average pool to 1x1 -> Linear(512, classes),
so any image size >= 8 works.

- ResNet18: norm "instancenorm" = GroupNorm(C, C, affine=True).
- ResNet18BN: BatchNorm2d.
- ResNet18_AP: every stride-2 conv becomes a stride-1 conv followed by AvgPool2d(2, 2)
  (in the block and in its shortcut), before the norm.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError
from .convnet import _check_choice, make_norm
from .registry import register_model, to_hw

__all__ = ["BasicBlock", "ResNet", "ResNet18", "ResNet18BN", "ResNet18_AP"]

_RESNET_NORMS = ("instancenorm", "batchnorm", "groupnorm", "none")


def _downsampling_conv(
    in_ch: int, out_ch: int, kernel: int, stride: int, avgpool_downsample: bool
) -> nn.Module:
    pad = kernel // 2
    if stride != 1 and avgpool_downsample:
        return nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride=1, padding=pad, bias=False),
            nn.AvgPool2d(stride, stride),
        )
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
    ):
        super().__init__()
        self.conv1 = _downsampling_conv(in_ch, out_ch, 3, stride, avgpool_downsample)
        self.norm1 = make_norm(norm, out_ch)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                _downsampling_conv(in_ch, out_ch, 1, stride, avgpool_downsample),
                make_norm(norm, out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks, a CIFAR-style stem and an adaptive-average-pool head."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int | Sequence[int],
        layers: Sequence[int] = (2, 2, 2, 2),
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
    ):
        super().__init__()
        _check_choice("norm", norm, _RESNET_NORMS)
        h, w = hw = to_hw(image_size)
        widths = (64, 128, 256, 512)[: len(layers)]
        if len(layers) < 1 or len(layers) > 4:
            raise InputError(f"ResNet: layers must have 1 to 4 stages, got {list(layers)}")
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.norm1 = make_norm(norm, 64)
        self.act1 = nn.ReLU()
        in_ch = 64
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                blocks.append(BasicBlock(in_ch, width, s, norm, avgpool_downsample))
                in_ch = width
            if stride == 2:
                # strided 3x3 conv, padding 1: ceil(h / 2); conv + AvgPool2d(2, 2): floor(h / 2)
                h, w = ((h // 2, w // 2) if avgpool_downsample
                        else ((h + 1) // 2, (w + 1) // 2))
                if min(h, w) < 1:
                    raise InputError(f"ResNet: image_size {hw} is too small (use >= 8)")
            stages.append(nn.Sequential(*blocks))
        self.layer1 = stages[0]
        self.layer2 = stages[1] if len(stages) > 1 else nn.Identity()
        self.layer3 = stages[2] if len(stages) > 2 else nn.Identity()
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()
        self.feature_shape = (in_ch, h, w)
        self.classifier = nn.Linear(in_ch, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # global average pool as a mean: AdaptiveAvgPool2d's CUDA backward has no
        # deterministic kernel (it fails under torch.use_deterministic_algorithms)
        return out.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@register_model
class ResNet18(ResNet):
    """ResNet18 with instance norm (GroupNorm(C, C)) by default."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 norm: str = "instancenorm"):
        super().__init__(channels, num_classes, image_size, (2, 2, 2, 2), norm)


@register_model
class ResNet18BN(ResNet):
    """ResNet18 with BatchNorm2d."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int]):
        super().__init__(channels, num_classes, image_size, (2, 2, 2, 2), "batchnorm")


@register_model
class ResNet18_AP(ResNet):
    """ResNet18 whose stride-2 convs are stride-1 convs followed by AvgPool2d(2, 2)."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 norm: str = "instancenorm"):
        super().__init__(channels, num_classes, image_size, (2, 2, 2, 2), norm,
                         avgpool_downsample=True)
