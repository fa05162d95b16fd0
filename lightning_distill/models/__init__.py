"""Network zoo (docs/method.md, section 'Networks') and flat-parameter helpers.

``build_model(name, channels, num_classes, image_size, **kw)`` builds any of
``list_models()``: ConvNet, ConvNetD4, ConvNetD5, ConvNetBN, AlexNet, VGG11, VGG11BN,
ResNet18, ResNet18BN, ResNet18_AP.
"""

from .alexnet import AlexNet
from .convnet import ConvBlock, ConvNet, ConvNetBN, ConvNetD4, ConvNetD5, make_act, make_norm
from .params import (
    ParamSpec,
    flatten_parameters,
    has_running_stats,
    load_flat_parameters,
    unflatten_parameters,
)
from .registry import build_model, is_model, list_models, model_entrypoint, register_model, to_hw
from .resnet import BasicBlock, ResNet, ResNet18, ResNet18_AP, ResNet18BN
from .vgg import VGG, VGG11, VGG11BN

__all__ = [
    "VGG",
    "VGG11",
    "VGG11BN",
    "AlexNet",
    "BasicBlock",
    "ConvBlock",
    "ConvNet",
    "ConvNetBN",
    "ConvNetD4",
    "ConvNetD5",
    "ParamSpec",
    "ResNet",
    "ResNet18",
    "ResNet18BN",
    "ResNet18_AP",
    "build_model",
    "flatten_parameters",
    "has_running_stats",
    "is_model",
    "list_models",
    "load_flat_parameters",
    "make_act",
    "make_norm",
    "model_entrypoint",
    "register_model",
    "to_hw",
    "unflatten_parameters",
]
