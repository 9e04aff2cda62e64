"""Frozen feature extractors: EfficientNet-Lite0 (always available) and torchvision models (local weights)."""

from .efficientnet_lite import TAP_CHANNELS, EfficientNetLite0, efficientnet_lite0
from .torchvision_ import TORCHVISION_BACKBONES, BackboneUnavailable, torchvision_backbone

__all__ = ["TAP_CHANNELS", "EfficientNetLite0", "efficientnet_lite0", "TORCHVISION_BACKBONES",
           "BackboneUnavailable", "torchvision_backbone"]
