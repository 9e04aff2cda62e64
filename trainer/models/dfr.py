"""DFR: deep feature reconstruction (Yang et al., "Unsupervised anomaly segmentation via deep feature
reconstruction", Neurocomputing 2020, arXiv:2012.07122), on the EfficientNet-Lite0 backbone.

Regional features: the input is reflection-padded by ``input_pad`` pixels (default 32), the backbone taps
(strides 2, 4, 8 by default; tap 1 adds the input image itself) are each resized (bilinear) to a common grid
at ``grid_stride`` (default 1: the input resolution, as in the paper), then mean-aggregated with a
``kernel`` x ``kernel`` window at ``stride`` (default 4 / 4, optional reflection padding), concatenated, and
the padding is cut off again: the regional feature grid is at stride grid_stride * stride (4 by default, so
the map is H/4 x W/4 directly). The padding keeps the backbone's zero padding away from the image border,
where it made every good image's border the most "anomalous" place (docs/dfr.md). With ``standardise``
(default) each channel is standardised with the mean/std of the training features (buffers, set by
``set_feature_stats``), so no tap dominates the error by its scale.
A 1x1-conv autoencoder (conv-BN-ReLU stacks c0 -> (c0+2cl)/2 -> 2cl -> cl -> 2cl -> (c0+2cl)/2 -> c0, as in
the authors' code) reconstructs them; the latent size cl is chosen by PCA at 90 % explained variance of the
(standardised) training features (paper, Appendix B): ``trainer.fit`` builds the autoencoder lazily, or pass
``latent=``. Map: per-location squared L2 reconstruction error (sum over channels), resized to H/4 x W/4.
The paper's configuration is ``taps=(2, 4, 8, 16), input_pad=0, standardise=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import TAP_CHANNELS, efficientnet_lite0

__all__ = ["DFR", "DFR_TAP_CHANNELS", "FeatureAutoencoder", "pca_latent_dim"]

IMAGE_TAP = 1  # the normalised input itself (3 channels): local intensity beside the backbone's texture
DFR_TAP_CHANNELS = {IMAGE_TAP: 3, **TAP_CHANNELS}


def pca_latent_dim(features: torch.Tensor, variance: float = 0.9) -> int:
    """Number of principal components explaining ``variance`` of N x C features."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"pca_latent_dim needs an N x C matrix with N >= 2, got {tuple(features.shape)}")
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    x = features.double() - features.double().mean(dim=0, keepdim=True)
    eig = torch.linalg.eigvalsh(x.T @ x / (x.shape[0] - 1)).flip(0).clamp(min=0)
    ratio = torch.cumsum(eig, 0) / eig.sum().clamp(min=1e-30)
    return int(torch.searchsorted(ratio, torch.tensor([variance], dtype=ratio.dtype) - 1e-12).item()) + 1


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FeatureAutoencoder(nn.Module):
    """DFR's 1x1 convolutional autoencoder (c0 -> cl -> c0)."""

    def __init__(self, in_channels: int, latent: int):
        super().__init__()
        if not 0 < latent <= in_channels:
            raise ValueError(f"DFR latent size must be in [1, {in_channels}], got {latent}")
        mid = (in_channels + 2 * latent) // 2
        self.latent = latent
        self.encoder = nn.Sequential(*_conv_bn_relu(in_channels, mid), *_conv_bn_relu(mid, 2 * latent),
                                     nn.Conv2d(2 * latent, latent, 1))
        self.decoder = nn.Sequential(*_conv_bn_relu(latent, 2 * latent), *_conv_bn_relu(2 * latent, mid),
                                     nn.Conv2d(mid, in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DFR(nn.Module):
    kind = "dfr"
    num_maps = 1
    map_stride = 4
    map_weights = (1.0,)

    def __init__(self, size: str = "s", taps: tuple[int, ...] = (2, 4, 8), kernel: int = 4,
                 stride: int = 4, grid_stride: int = 1, reflect_pad: int = 0, latent: int | None = None,
                 standardise: bool = True, input_pad: int = 32, backbone_weights: str | None = None,
                 pretrained: bool = True):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown DFR size {size!r}: valid are ['s']")
        unknown = [t for t in taps if t not in DFR_TAP_CHANNELS]
        if unknown or not taps or tuple(taps) == (IMAGE_TAP,):
            raise ValueError(f"DFR taps {list(taps)} invalid: choose from {sorted(DFR_TAP_CHANNELS)} "
                             f"(1: the input image) with at least one backbone tap")
        if kernel < 1 or stride < 1 or grid_stride < 1 or reflect_pad < 0:
            raise ValueError("DFR kernel, stride and grid_stride must be >= 1 and reflect_pad >= 0")
        if input_pad < 0 or input_pad % (grid_stride * stride) or input_pad % max(taps):
            raise ValueError(f"DFR input_pad must be >= 0 and a multiple of grid_stride * stride "
                             f"({grid_stride * stride}) and of the deepest tap ({max(taps)}): {input_pad}")
        self.size = size
        self.taps = tuple(taps)
        self.kernel, self.stride = kernel, stride
        self.grid_stride, self.reflect_pad, self.input_pad = grid_stride, reflect_pad, input_pad
        self.backbone = efficientnet_lite0(backbone_weights, pretrained=pretrained, frozen=True)
        self.input_mean = self.backbone.input_mean
        self.input_std = self.backbone.input_std
        self.in_channels = sum(DFR_TAP_CHANNELS[t] for t in self.taps)
        self.standardise = bool(standardise)
        self.register_buffer("feature_mean", torch.zeros(1, self.in_channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, self.in_channels, 1, 1))
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool))
        self.autoencoder: FeatureAutoencoder | None = None
        if latent is not None:
            self.build_autoencoder(latent)

    def build_autoencoder(self, latent: int) -> FeatureAutoencoder:
        self.autoencoder = FeatureAutoencoder(self.in_channels, int(latent))
        return self.autoencoder

    @property
    def latent(self) -> int | None:
        return None if self.autoencoder is None else self.autoencoder.latent

    def train(self, mode: bool = True) -> DFR:
        super().train(mode)
        self.backbone.train(False)
        return self

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Per-channel mean/std of N x C0 raw regional features of training images (``standardise``)."""
        if features.ndim != 2 or features.shape[1] != self.in_channels or features.shape[0] < 2:
            raise ValueError(f"feature statistics need N x {self.in_channels} features with N >= 2, "
                             f"got {tuple(features.shape)}")
        self.feature_mean.copy_(features.mean(dim=0).view_as(self.feature_mean))
        self.feature_std.copy_(features.std(dim=0).clamp(min=1e-6).view_as(self.feature_std))
        self.stats_set.fill_(True)

    def regional_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x C0 x h x w regional features, standardised per channel when ``standardise`` (no gradient)."""
        f = self.raw_regional_features(x)
        return (f - self.feature_mean) / self.feature_std if self.standardise else f

    def raw_regional_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x C0 x h x w regional features before standardisation (frozen backbone: no gradient)."""
        p = self.input_pad
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        grid = (h // self.grid_stride, w // self.grid_stride)
        with torch.no_grad():
            feats = {IMAGE_TAP: x, **self.backbone.features(x, tuple(t for t in self.taps if t != IMAGE_TAP))}
            f = torch.cat([F.interpolate(feats[t], size=grid, mode="bilinear", align_corners=False)
                           for t in self.taps], dim=1)
            if self.reflect_pad:
                p = self.reflect_pad
                f = F.pad(f, (p, p, p, p), mode="reflect")
            f = F.avg_pool2d(f, self.kernel, self.stride)
        c = self.input_pad // (self.grid_stride * self.stride)
        return f[..., c:f.shape[-2] - c, c:f.shape[-1] - c] if c else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            raise RuntimeError("DFR autoencoder is not built yet: train with trainer.fit.fit "
                               "(latent size from PCA) or create the model with latent=<int>")
        f = self.regional_features(x)
        err = ((self.autoencoder(f) - f) ** 2).sum(dim=1, keepdim=True)
        out_hw = (int(x.shape[-2]) // self.map_stride, int(x.shape[-1]) // self.map_stride)
        if tuple(err.shape[-2:]) != out_hw:
            err = F.interpolate(err, size=out_hw, mode="bilinear", align_corners=False)
        return err
