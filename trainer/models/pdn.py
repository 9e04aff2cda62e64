"""Patch description networks (PDN) of EfficientAD: Batzner et al., "EfficientAD", WACV 2024, Table 6/7.

``padded=False`` (default) is the official implementation: 256 px in -> 56 px out, and the anomaly maps are
then padded by 4 on each side, which gives exactly H/4 x W/4 for any H, W divisible by 4 (H, W >= 48).
``padded=True`` keeps the paper's paddings (3/1/1) and gives H/4 x W/4 directly.
"""

from __future__ import annotations

from torch import nn

__all__ = ["pdn_small", "pdn_medium", "pdn_output_size"]


def pdn_small(out_channels: int, padded: bool = False) -> nn.Sequential:
    p = 1 if padded else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_medium(out_channels: int, padded: bool = False) -> nn.Sequential:
    p = 1 if padded else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


def pdn_output_size(size: int, padded: bool = False) -> int:
    """Output side length of either PDN for an input side length (both have the same geometry)."""
    p = 1 if padded else 0
    size = size + 6 * p - 3          # conv k4
    size = (size + 2 * p - 2) // 2 + 1  # avgpool 2/2
    size = size + 6 * p - 3
    size = (size + 2 * p - 2) // 2 + 1
    size = size + 2 * p - 2          # conv k3
    return size - 3                  # conv k4
