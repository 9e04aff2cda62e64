"""Reconstruction autoencoder baseline: a convolutional encoder/decoder trained with MSE on good images; the
anomaly map is the per-pixel reconstruction error (the "AE-L2" baseline of Bergmann et al., VISAPP 2019, made
fully convolutional so it runs on any image size).

Encoder: four stride-2 4x4 convolutions (32, 64, 128, 128 channels, LeakyReLU 0.2) and a 1x1 bottleneck of
``latent`` channels at stride 16 (16 for the default: 16 x 16 x 16 for a 256 tile, 48x fewer numbers than
the image). Decoder: four (x2 bilinear upsample, 3x3 conv) stages back to the image. Inputs are padded (edge
replication) to a multiple of 16 and the output cropped back.
``forward(x)`` -> B x 1 x H/4 x W/4: channel mean of the squared error, averaged over 4 x 4 pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionAE", "pad_to_multiple"]

ENCODER_CHANNELS = (32, 64, 128, 128)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of B x C x H x W so H and W are multiples of ``multiple``."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ReconstructionAE(nn.Module):
    kind = "reconstruction"
    num_maps = 1
    map_stride = 4
    map_weights = (1.0,)
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, size: str = "s", latent: int = 16):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown reconstruction size {size!r}: valid are ['s']")
        if latent < 1:
            raise ValueError(f"reconstruction latent channels must be >= 1, got {latent}")
        self.size, self.latent = size, int(latent)
        enc, cin = [], 3
        for cout in ENCODER_CHANNELS:
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), _act()]
            cin = cout
        enc.append(nn.Conv2d(cin, self.latent, 1))
        self.encoder = nn.Sequential(*enc)
        dec, cin = [nn.Conv2d(self.latent, ENCODER_CHANNELS[-1], 1), _act()], ENCODER_CHANNELS[-1]
        for cout in reversed(ENCODER_CHANNELS[:-1]):
            dec += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(cin, cout, 3, padding=1), _act()]
            cin = cout
        dec += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of normalised x (same size as x)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return self.decoder(self.encoder(pad_to_multiple(x, 16)))[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        err = ((self.reconstruct(x) - x) ** 2).mean(dim=1, keepdim=True)
        return F.avg_pool2d(err, self.map_stride)
