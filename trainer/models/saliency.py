"""Zero-shot saliency: the image-context prompt of SAA+ (Cao et al., "Segment Any Anomaly without Training
via Hybrid Prompt Regularization", arXiv:2305.10724), on our offline backbone. No training data needed.

Each cell of a coarse feature grid (frozen EfficientNet-Lite0 taps at strides 8 and 16, resized to the
stride-``grid_stride`` grid, concatenated, L2-normalised per cell) is scored by its mean cosine distance to
its ``k`` nearest neighbours *in the same image*: a defect is unlike the rest of its own image. Cells within
``exclude_radius`` grid steps of a cell are not its neighbours (adjacent cells share receptive fields and
would always look alike). Export-friendly: a B x N x N cosine-similarity matmul and ``topk`` (a 256 tile at
stride 8 is N = 1024 cells: a 1024 x 1024 matrix).
``forward(x)`` -> B x 1 x H/4 x W/4 (bilinear from the grid).

Full SAA+ also needs foundation models this runtime cannot load offline: a text-prompted detector
(Grounding DINO) proposes defect boxes, a promptable segmenter (SAM) turns them into masks, and the hybrid
prompts (domain-expert knowledge: defect area, count; image context: this saliency) filter and rescore them.
``RegionPrompter`` is the hook for a user who has those models; ``rescore_regions`` is the SAA+ image-context
rescoring of its regions. Without a configured prompter, ``UnconfiguredPrompter`` raises
``FoundationModelsUnavailable``; nothing here pretends to run SAA+.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import TAP_CHANNELS, efficientnet_lite0

__all__ = ["ZeroShotSaliency", "Region", "RegionPrompter", "UnconfiguredPrompter",
           "FoundationModelsUnavailable", "rescore_regions"]

SALIENCY_TAPS = (8, 16)


class ZeroShotSaliency(nn.Module):
    kind = "saliency"
    num_maps = 1
    map_stride = 4
    map_weights = (1.0,)

    def __init__(self, size: str = "s", k: int = 16, grid_stride: int = 8, exclude_radius: int = 1,
                 backbone_weights: str | None = None, pretrained: bool = True):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown saliency size {size!r}: valid are ['s']")
        if k < 1 or grid_stride not in (8, 16) or exclude_radius < 0:
            raise ValueError("saliency: k >= 1, grid_stride 8 or 16, exclude_radius >= 0")
        self.size, self.k = size, int(k)
        self.grid_stride, self.exclude_radius = int(grid_stride), int(exclude_radius)
        self.backbone = efficientnet_lite0(backbone_weights, pretrained=pretrained, frozen=True)
        self.input_mean, self.input_std = self.backbone.input_mean, self.backbone.input_std
        self.channels = sum(TAP_CHANNELS[t] for t in SALIENCY_TAPS)

    def train(self, mode: bool = True) -> ZeroShotSaliency:
        return super().train(False)

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x gh x gw L2-normalised features on the stride-grid_stride grid."""
        gh, gw = -(-int(x.shape[-2]) // self.grid_stride), -(-int(x.shape[-1]) // self.grid_stride)
        feats = self.backbone.features(x, SALIENCY_TAPS)
        f = torch.cat([F.interpolate(feats[t], size=(gh, gw), mode="bilinear", align_corners=False)
                       for t in SALIENCY_TAPS], dim=1)
        return f / f.norm(dim=1, keepdim=True).clamp(min=1e-6)

    def _excluded(self, gh: int, gw: int) -> torch.Tensor:
        """N x N bool: pairs within exclude_radius grid steps (Chebyshev), the diagonal included. Built in
        NumPy from the static grid size, so exporters see a constant."""
        ys, xs = np.divmod(np.arange(gh * gw), gw)
        near = ((np.abs(ys[:, None] - ys[None, :]) <= self.exclude_radius)
                & (np.abs(xs[:, None] - xs[None, :]) <= self.exclude_radius))
        return torch.from_numpy(near)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.grid_features(x)
        gh, gw = int(f.shape[-2]), int(f.shape[-1])
        n = gh * gw
        if n - (2 * self.exclude_radius + 1) ** 2 < self.k:
            raise ValueError(f"saliency: a {gh} x {gw} grid has fewer than k={self.k} cells outside the "
                             f"exclusion radius: use a larger image or a smaller k")
        flat = f.flatten(2)  # B x C x N
        sim = flat.transpose(1, 2) @ flat  # B x N x N cosine similarities
        sim = sim.masked_fill(self._excluded(gh, gw).to(sim.device), -2.0)
        nearest = sim.topk(self.k, dim=-1).values  # B x N x k
        score = (1.0 - nearest).mean(dim=-1).reshape(-1, 1, gh, gw)
        out_hw = (int(x.shape[-2]) // self.map_stride, int(x.shape[-1]) // self.map_stride)
        return F.interpolate(score, size=out_hw, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- the SAA+ hook (foundation models)

@dataclass(frozen=True)
class Region:
    """A candidate defect region from a foundation-model prompter: H x W bool mask and its confidence."""

    mask: np.ndarray
    confidence: float
    label: str = ""


@runtime_checkable
class RegionPrompter(Protocol):
    """Text-prompted region proposals (SAA+: Grounding DINO boxes -> SAM masks) for one uint8 image."""

    def propose(self, image: np.ndarray, prompts: Sequence[str]) -> list[Region]: ...


class FoundationModelsUnavailable(RuntimeError):
    """Full SAA+ was asked for but no RegionPrompter (detector + segmenter) is configured."""


class UnconfiguredPrompter:
    """The default prompter: refuses clearly, because the foundation models cannot be loaded offline here."""

    def propose(self, image: np.ndarray, prompts: Sequence[str]) -> list[Region]:
        raise FoundationModelsUnavailable(
            "full SAA+ needs a text-prompted detector (e.g. Grounding DINO) and a promptable segmenter "
            "(e.g. SAM); none is bundled or downloadable here. Implement "
            "trainer.models.saliency.RegionPrompter with local weights and pass it in; the zero-shot "
            "saliency map alone is the 'saliency' model kind")


def rescore_regions(regions: Sequence[Region], saliency: np.ndarray, max_area: float = 0.3,
                    top: int | None = None) -> list[tuple[Region, float]]:
    """SAA+ regularisation of prompter regions: drop regions over ``max_area`` of the image (domain-expert
    prompt), score the rest by confidence x mean saliency inside the mask (image-context prompt), best first.
    ``saliency`` is an h x w map; masks of another size are compared after nearest resizing of the map."""
    out = []
    for region in regions:
        mask = np.asarray(region.mask, dtype=bool)
        if mask.ndim != 2 or not mask.any() or mask.mean() > max_area:
            continue
        sal = saliency
        if sal.shape != mask.shape:
            rows = np.arange(mask.shape[0]) * sal.shape[0] // mask.shape[0]
            cols = np.arange(mask.shape[1]) * sal.shape[1] // mask.shape[1]
            sal = sal[rows][:, cols]
        out.append((region, float(region.confidence) * float(sal[mask].mean())))
    out.sort(key=lambda item: -item[1])
    return out if top is None else out[:top]
