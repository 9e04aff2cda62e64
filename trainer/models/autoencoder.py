"""EfficientAD autoencoder (Batzner et al., WACV 2024, Table 8), scaled to any input size.

For a 256 x 256 input the encoder ends in a 1 x 1 x 64 bottleneck (last conv kernel 8) and the decoder
upsamples to 3, 8, 15, 32, 63, 127 then to the PDN output size (56). For other sizes the last encoder kernel
is H/32 x W/32 and the decoder sizes are scaled by H/256, W/256 (at least 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Autoencoder", "DECODER_SIZES_256"]

DECODER_SIZES_256 = (3, 8, 15, 32, 63, 127)


def _scaled(size: int, side: int) -> int:
    return max(1, round(size * side / 256))


class Autoencoder(nn.Module):
    """Conv encoder to a 64-d bottleneck, upsample+conv decoder to ``out_hw`` with ``out_channels``."""

    def __init__(self, image_hw: tuple[int, int], out_hw: tuple[int, int], out_channels: int = 384,
                 dropout: float = 0.2):
        super().__init__()
        h, w = image_hw
        if h % 32 or w % 32:
            raise ValueError(f"EfficientAD autoencoder needs an input size divisible by 32, got {h} x {w}")
        self.image_hw = (h, w)
        self.out_hw = tuple(out_hw)
        enc = []
        for cin, cout in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, 64, (h // 32, w // 32)))
        self.encoder = nn.Sequential(*enc)
        self.sizes = tuple((_scaled(s, h), _scaled(s, w)) for s in DECODER_SIZES_256)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, 64, 4, stride=1, padding=2), nn.ReLU(inplace=True),
                          nn.Dropout(dropout))
            for _ in self.sizes)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, stage in zip(self.sizes, self.stages, strict=True):
            z = stage(F.interpolate(z, size=size, mode="bilinear", align_corners=False))
        z = F.interpolate(z, size=self.out_hw, mode="bilinear", align_corners=False)
        return self.head(z)
