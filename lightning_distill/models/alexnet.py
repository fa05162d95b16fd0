"""AlexNet in the DC/DSA benchmark flavour (cross-architecture nets;
docs/method.md, section 'Networks').

Five convs, ReLU, no normalisation, 2x2 max-pool after conv1, conv2 and conv5::

    conv 5x5 -> 128 (padding 2; 4 for 28x28 input), pool
    conv 5x5 -> 192 (padding 2), pool
    conv 3x3 -> 256, conv 3x3 -> 192, conv 3x3 -> 192 (padding 1), pool
    Flatten -> Linear(192 * h * w, num_classes)

The classifier is sized from the actual feature map; a pool that would shrink a map
below 1x1 is skipped (tiny inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError
from .registry import register_model, to_hw

__all__ = ["AlexNet"]


class ConvFeaturesLinear(nn.Module):
    """Base of the plain conv stacks (AlexNet, VGG): ``features`` -> flatten -> one Linear.

    Subclasses build their conv layers and call :meth:`_set_head`, which sizes the
    classifier from the final feature map ``(C, h, w)``.
    """

    def _set_head(
        self, layers: list[nn.Module], feature_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        c, h, w = feature_shape
        self.features = nn.Sequential(*layers)
        self.feature_shape = feature_shape
        self.classifier = nn.Linear(c * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@register_model
class AlexNet(ConvFeaturesLinear):
    """DC/DSA AlexNet: 5 convs (128, 192, 256, 192, 192), ReLU, max-pool, linear head."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int]):
        super().__init__()
        hw = to_hw(image_size)
        first_pad = 4 if hw == (28, 28) else 2
        # (out_channels, kernel, padding, pool after)
        spec = [
            (128, 5, first_pad, True),
            (192, 5, 2, True),
            (256, 3, 1, False),
            (192, 3, 1, False),
            (192, 3, 1, True),
        ]
        layers: list[nn.Module] = []
        h, w = hw
        in_ch = channels
        for out_ch, k, pad, pool in spec:
            layers += [nn.Conv2d(in_ch, out_ch, k, padding=pad), nn.ReLU()]
            h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
            if min(h, w) < 1:
                raise InputError(f"AlexNet: image_size {hw} is too small")
            if pool and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            in_ch = out_ch
        self._set_head(layers, (in_ch, h, w), num_classes)
