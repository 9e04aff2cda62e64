"""TSDN: two-stream decoder network with a feature normality estimator, trained on superpixel random
filling (after "Two-stream Decoder Feature Normality Estimating Network for Industrial Anomaly Fusion
Detection", Ma et al., ICASSP 2023). Our reading, kept small; what is ours is said so.

- Encoder: three stride-2 conv stages (32, 64, 128 channels, 2 convs each), stride 8.
- Feature normality estimator (FNE): ``prototypes`` (M x C, learned) describe normal bottleneck features.
  Each location is rebuilt as a softmax-attention mix of the prototypes (f_n); each channel's deviation
  d_c = mean_xy (f_c - f_n,c)^2 / (mean_xy f_n,c^2 + eps) gives a normality weight w_c = exp(-d_c), and the
  feature becomes w * f + (1 - w) * f_n: channels that look abnormal are suppressed (replaced by their
  normal estimate). The weight formula is our choice; the paper describes the intent, not this formula.
- Normal reconstruction decoder: from the FNE output, (upsample x2, conv) x 3 back to the image; trained to
  output the *clean* image from its superpixel-filled version (MSE).
- Abnormal-mask decoder: from the raw (un-suppressed) encoder features, (upsample x2, conv) x 3 to one logit
  channel; trained with BCE against the filled superpixels. It shapes the shared encoder; the deployed map
  does not use it.
Fake anomalies: trainer.data.superpixels.random_fill (SLIC superpixels painted with random colours).

``forward(x)`` -> B x 1 x H/4 x W/4: channel mean of the squared reconstruction error, blurred with a Gaussian
(``blur_sigma`` px, separable, a fixed buffer), averaged over 4 x 4 pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .reconstruction import pad_to_multiple

__all__ = ["TSDN", "FeatureNormalityEstimator", "gaussian_kernel"]

WIDTHS = (32, 64, 128)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


def _decoder(out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    chans = list(reversed(WIDTHS))  # 128, 64, 32
    for cin, cout in zip(chans, chans[1:] + [chans[-1]], strict=True):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(chans[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class FeatureNormalityEstimator(nn.Module):
    """Rebuild features from normal prototypes and suppress the channels that deviate from them."""

    def __init__(self, channels: int, prototypes: int = 32):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(prototypes, channels) / math.sqrt(channels))
        self.scale = 1.0 / math.sqrt(channels)

    def normal_estimate(self, f: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f.shape
        q = f.flatten(2).transpose(1, 2)  # B x N x C
        attn = torch.softmax(q @ self.prototypes.t() * self.scale, dim=-1)  # B x N x M
        return (attn @ self.prototypes).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(suppressed features, normal estimate f_n)."""
        fn = self.normal_estimate(f)
        energy = (fn ** 2).mean(dim=(2, 3), keepdim=True) + 1e-6
        dev = ((f - fn) ** 2).mean(dim=(2, 3), keepdim=True) / energy
        weight = torch.exp(-dev)
        return weight * f + (1.0 - weight) * fn, fn


class TSDN(nn.Module):
    kind = "tsdn"
    num_maps = 1
    map_stride = 4
    map_weights = (1.0,)
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, size: str = "s", prototypes: int = 32, blur_sigma: float = 2.0,
                 srf_segments: int = 64, srf_probability: float = 0.5):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown TSDN size {size!r}: valid are ['s']")
        if prototypes < 1 or blur_sigma <= 0 or srf_segments < 2 or not 0 <= srf_probability <= 1:
            raise ValueError("TSDN: prototypes >= 1, blur_sigma > 0, srf_segments >= 2 and "
                             "srf_probability in [0, 1]")
        self.size = size
        self.srf_segments, self.srf_probability = int(srf_segments), float(srf_probability)
        self.encoder = nn.Sequential(_block(3, WIDTHS[0], 2), _block(WIDTHS[0], WIDTHS[1], 2),
                                     _block(WIDTHS[1], WIDTHS[2], 2))
        self.fne = FeatureNormalityEstimator(WIDTHS[2], prototypes)
        self.normal_decoder = _decoder(3)
        self.mask_decoder = _decoder(1)
        k = gaussian_kernel(blur_sigma)
        self.register_buffer("blur_x", k.view(1, 1, 1, -1))
        self.register_buffer("blur_y", k.view(1, 1, -1, 1))

    def streams(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both decoders on normalised x: reconstruction (B x 3 x H x W), mask logits (B x 1 x H x W),
        encoder features and their normal estimate (for the FNE compactness loss)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        f = self.encoder(pad_to_multiple(x, 8))
        suppressed, normal = self.fne(f)
        return {"reconstruction": self.normal_decoder(suppressed)[..., :h, :w],
                "mask_logits": self.mask_decoder(f)[..., :h, :w], "features": f, "normal": normal}

    def blur(self, m: torch.Tensor) -> torch.Tensor:
        rx, ry = self.blur_x.shape[-1] // 2, self.blur_y.shape[-2] // 2
        m = F.conv2d(F.pad(m, (rx, rx, 0, 0), mode="replicate"), self.blur_x)
        return F.conv2d(F.pad(m, (0, 0, ry, ry), mode="replicate"), self.blur_y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        f = self.encoder(pad_to_multiple(x, 8))
        recon = self.normal_decoder(self.fne(f)[0])[..., :h, :w]
        err = ((recon - x) ** 2).mean(dim=1, keepdim=True)
        return F.avg_pool2d(self.blur(err), self.map_stride)
