"""Model registry: ``create_model(kind, size, **options)`` builds any trainable anomaly model by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .dfr import DFR
from .efficientad import PDN_BUILDERS, EfficientAD
from .mkd import MKD
from .patchcore import PatchCore
from .reconstruction import ReconstructionAE
from .saliency import ZeroShotSaliency
from .tsdn import TSDN

__all__ = ["MODEL_KINDS", "MODEL_SIZES", "create_model"]


def _efficientad(size: str = "s", **options) -> nn.Module:
    return EfficientAD(size=size, **options)


def _dfr(size: str = "s", **options) -> nn.Module:
    return DFR(size=size, **options)


def _reconstruction(size: str = "s", **options) -> nn.Module:
    return ReconstructionAE(size=size, **options)


def _mkd(size: str = "s", **options) -> nn.Module:
    return MKD(size=size, **options)


def _tsdn(size: str = "s", **options) -> nn.Module:
    return TSDN(size=size, **options)


def _patchcore(size: str = "s", **options) -> nn.Module:
    return PatchCore(size=size, **options)


def _saliency(size: str = "s", **options) -> nn.Module:
    return ZeroShotSaliency(size=size, **options)


MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {
    "efficientad": _efficientad, "dfr": _dfr, "reconstruction": _reconstruction, "mkd": _mkd, "tsdn": _tsdn,
    "saliency": _saliency, "patchcore": _patchcore}
MODEL_SIZES: dict[str, tuple[str, ...]] = {
    "efficientad": tuple(sorted(PDN_BUILDERS)), "dfr": ("s",), "reconstruction": ("s",), "mkd": ("s",),
    "tsdn": ("s",), "saliency": ("s",), "patchcore": ("s",)}


def create_model(kind: str, size: str = "s", **options) -> nn.Module:
    """Build a model: EfficientAD options tile, alpha, padded; DFR options taps, kernel, stride, grid_stride,
    reflect_pad, latent, backbone_weights, pretrained; reconstruction latent; MKD width, direction_weight,
    backbone_weights, pretrained; TSDN prototypes, blur_sigma, srf_segments, srf_probability; saliency k,
    grid_stride, exclude_radius, backbone_weights, pretrained; PatchCore taps, aggregate, pad, bank_fraction,
    min_bank, pool_size, projection_dim, knn, position_weight, seed, backbone_weights, pretrained."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: valid are {sorted(MODEL_KINDS)}")
    if size not in MODEL_SIZES[kind]:
        raise ValueError(f"unknown size {size!r} for {kind}: valid are {list(MODEL_SIZES[kind])}")
    return MODEL_KINDS[kind](size, **options)
