"""Multiresolution knowledge distillation (MKD: Salehi et al., "Multiresolution Knowledge Distillation for
Anomaly Detection", CVPR 2021, arXiv:2011.11108), on our offline backbone.

Expert: the frozen pretrained EfficientNet-Lite0 (the paper uses VGG-16), read at strides 4, 8 and 16
(24 + 40 + 112 channels), each tap standardised per channel with statistics of the training images (buffers,
so they travel in the export). Cloner: a small plain CNN (conv-ReLU, no normalisation layers) with a 1x1 head
per depth giving the same channels at the same strides. Training (trainer.losses.mkd_loss): value loss (mean
squared difference) + ``direction_weight`` x direction loss (1 - cosine similarity), summed over the depths.
The paper takes the cosine of each layer's whole flattened activation; we take it per location (over
channels), which is what a localisation map needs.

``forward(x)`` -> B x 2 x H/4 x W/4 raw maps: [value discrepancy, direction discrepancy], each summed over the
depths after bilinear resizing to the map grid; ``map_weights`` (0.5, 0.5) combines them after normalisation
(the paper localises with gradients of the loss; we use the discrepancy itself, cheap and exportable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import TAP_CHANNELS, efficientnet_lite0

__all__ = ["MKD", "Cloner", "MKD_TAPS"]

MKD_TAPS = (4, 8, 16)


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]


class Cloner(nn.Module):
    """Small CNN: stride-4/8/16 features with the expert's channel counts (one 1x1 head per depth)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv(3, w, 2), *_conv(w, w), *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w)),  # /4
            nn.Sequential(*_conv(2 * w, 3 * w, 2), *_conv(3 * w, 3 * w)),  # /8
            nn.Sequential(*_conv(3 * w, 4 * w, 2), *_conv(4 * w, 4 * w)),  # /16
        ])
        widths = (2 * w, 3 * w, 4 * w)
        self.heads = nn.ModuleList(nn.Conv2d(c, TAP_CHANNELS[t], 1)
                                   for c, t in zip(widths, MKD_TAPS, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out


class MKD(nn.Module):
    kind = "mkd"
    num_maps = 2
    map_stride = 4
    map_weights = (0.5, 0.5)

    def __init__(self, size: str = "s", width: int = 32, direction_weight: float = 1.0,
                 backbone_weights: str | None = None, pretrained: bool = True):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown MKD size {size!r}: valid are ['s']")
        if width < 4 or direction_weight < 0:
            raise ValueError("MKD width must be >= 4 and direction_weight >= 0")
        self.size, self.direction_weight = size, float(direction_weight)
        self.expert = efficientnet_lite0(backbone_weights, pretrained=pretrained, frozen=True)
        self.input_mean, self.input_std = self.expert.input_mean, self.expert.input_std
        self.cloner = Cloner(width)
        for t in MKD_TAPS:
            self.register_buffer(f"mean_{t}", torch.zeros(1, TAP_CHANNELS[t], 1, 1))
            self.register_buffer(f"std_{t}", torch.ones(1, TAP_CHANNELS[t], 1, 1))
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool))

    def train(self, mode: bool = True) -> MKD:
        super().train(mode)
        self.expert.train(False)
        return self

    @torch.no_grad()
    def raw_expert(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.expert.features(x, MKD_TAPS)
        return [feats[t] for t in MKD_TAPS]

    @torch.no_grad()
    def set_expert_stats(self, batches: list[torch.Tensor]) -> None:
        """Per-channel mean/std of each expert tap over normalised input batches."""
        feats = [self.raw_expert(b) for b in batches]
        for i, t in enumerate(MKD_TAPS):
            f = torch.cat([fs[i].transpose(0, 1).reshape(TAP_CHANNELS[t], -1) for fs in feats], dim=1)
            getattr(self, f"mean_{t}").copy_(f.mean(dim=1).view(1, -1, 1, 1))
            getattr(self, f"std_{t}").copy_(f.std(dim=1).clamp(min=1e-6).view(1, -1, 1, 1))
        self.stats_set.fill_(True)

    def expert_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(f - getattr(self, f"mean_{t}")) / getattr(self, f"std_{t}")
                for f, t in zip(self.raw_expert(x), MKD_TAPS, strict=True)]

    def pairs(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(expert, cloner) features per depth; the cloner output is cropped to the expert's grid."""
        out = []
        for e, c in zip(self.expert_features(x), self.cloner(x), strict=True):
            h, w = min(e.shape[-2], c.shape[-2]), min(e.shape[-1], c.shape[-1])
            out.append((e[..., :h, :w], c[..., :h, :w]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_hw = (int(x.shape[-2]) // self.map_stride, int(x.shape[-1]) // self.map_stride)
        value = direction = None
        for e, c in self.pairs(x):
            v = ((e - c) ** 2).mean(dim=1, keepdim=True)
            d = 1.0 - F.cosine_similarity(e, c, dim=1, eps=1e-6).unsqueeze(1)
            v = F.interpolate(v, size=out_hw, mode="bilinear", align_corners=False)
            d = F.interpolate(d, size=out_hw, mode="bilinear", align_corners=False)
            value = v if value is None else value + v
            direction = d if direction is None else direction + d
        return torch.cat([value, direction], dim=1)
