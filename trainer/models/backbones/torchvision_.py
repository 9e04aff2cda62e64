"""WideResNet-101 / VGG19 feature taps from torchvision, only with a local weights file (never downloads).

torchvision is optional: without it, or without a weights file, ``torchvision_backbone`` raises
BackboneUnavailable with what to do. Taps are returned like EfficientNetLite0.features: {stride: tensor}.
Inputs use the ImageNet normalisation (IMAGENET_MEAN / IMAGENET_STD).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["TORCHVISION_BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneUnavailable",
           "TorchvisionTaps", "torchvision_backbone"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# name -> (torchvision constructor, {stride: module path of the tap})
TORCHVISION_BACKBONES: dict[str, tuple[str, dict[int, str]]] = {
    "wide_resnet101_2": ("wide_resnet101_2", {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}),
    "vgg19": ("vgg19", {2: "features.8", 4: "features.17", 8: "features.26", 16: "features.35"}),
}


class BackboneUnavailable(RuntimeError):
    """A torchvision backbone was asked for but torchvision or its local weights are missing."""


class TorchvisionTaps(nn.Module):
    """Frozen torchvision network exposing ``features(x, taps) -> {stride: tensor}`` via forward hooks."""

    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD

    def __init__(self, network: nn.Module, tap_modules: dict[int, str]):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.tap_modules = dict(tap_modules)
        self._captured: dict[int, torch.Tensor] = {}
        modules = dict(network.named_modules())
        for stride, name in self.tap_modules.items():
            modules[name].register_forward_hook(self._hook(stride))

    def _hook(self, stride: int):
        def capture(_module, _inputs, output):
            self._captured[stride] = output
        return capture

    def train(self, mode: bool = True) -> TorchvisionTaps:
        return super().train(False)

    def features(self, x: torch.Tensor, taps: tuple[int, ...] = (4, 8, 16)) -> dict[int, torch.Tensor]:
        unknown = [t for t in taps if t not in self.tap_modules]
        if unknown:
            raise ValueError(f"unknown feature taps {unknown}: valid strides are {sorted(self.tap_modules)}")
        self._captured = {}
        self.network(x)
        out = {t: self._captured[t] for t in taps}
        self._captured = {}
        return out


def torchvision_backbone(name: str, weights_path: str | Path | None) -> TorchvisionTaps:
    """Build ``name`` (see TORCHVISION_BACKBONES) from torchvision and load ``weights_path`` strictly."""
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown torchvision backbone {name!r}: valid are {sorted(TORCHVISION_BACKBONES)}")
    if weights_path is None:
        raise BackboneUnavailable(f"backbone {name!r} needs a local weights file (weights_path); "
                                  "edge-inspect never downloads weights")
    path = Path(weights_path)
    if not path.is_file():
        raise BackboneUnavailable(f"weights file {path} for backbone {name!r} does not exist")
    try:
        import torchvision.models as tv_models
    except ImportError as exc:
        raise BackboneUnavailable(f"backbone {name!r} needs torchvision, which is not installed; "
                                  "use the built-in efficientnet_lite0 backbone instead") from exc
    constructor, taps = TORCHVISION_BACKBONES[name]
    network = getattr(tv_models, constructor)(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneUnavailable(f"cannot read weights file {path}: {exc}") from exc
    network.load_state_dict(state, strict=True)
    return TorchvisionTaps(network, taps)
