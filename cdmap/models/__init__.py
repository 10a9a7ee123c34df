"""FSG-Net model, its configuration and backbone weight loading."""

from cdmap.models.backbones import LoadReport, load_backbone_weights, load_efficientnet_lite0_imagenet
from cdmap.models.config import BACKBONES, ModelConfig
from cdmap.models.fsgnet import FSGNet, build_model, count_parameters

__all__ = [
    "BACKBONES",
    "FSGNet",
    "LoadReport",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "load_backbone_weights",
    "load_efficientnet_lite0_imagenet",
]
