"""EfficientAD: student-teacher + autoencoder anomaly detection (Batzner et al., WACV 2024, arXiv:2303.14535).

The model holds the teacher PDN (384 channels, frozen after distillation), the student PDN (768 channels: the
first 384 regress the teacher, the last 384 the autoencoder) and the autoencoder. The teacher's channel
mean/std and a ``teacher_trained`` flag are buffers, so ``state_dict()`` is the complete model.

``forward(x)`` is the exported core: x is B x 3 x H x W (the configured tile) normalised with input_mean/std;
it returns B x 2 x H/4 x W/4: the student-teacher and student-autoencoder maps (channel means of squared
differences). Map normalisation (q_a/q_b) and the ``map_weights`` combination happen in the deploy graph
(engines.graph.MapPostprocess).

Borders (``border``). The unpadded PDN (receptive field 33 px) gives H/4 - 8 outputs per side, centred on
the tile minus a 16 px band. ``border="reflect"`` (default) reflects 16 px of the tile onto each side before
the teacher and the student, so they give exactly H/4 x W/4 outputs, output i centred on pixel 4 i of the
tile: every pixel of a tile is scored, with mirrored context at the edge (a defect touching the edge is seen
with its mirror image). ``border="none"`` is the official implementation: the maps are zero-padded by 4,
so a 16 px band on every side of every tile is blind (44 % of a 128 px tile). ``padded=True`` uses the
paper's zero paddings inside the PDN instead (border is then not used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import Autoencoder
from .backbones.torchvision_ import IMAGENET_MEAN, IMAGENET_STD
from .pdn import pdn_medium, pdn_output_size, pdn_small

__all__ = ["EfficientAD", "TEACHER_CHANNELS", "PDN_BUILDERS", "BORDERS", "BORDER_PAD"]

TEACHER_CHANNELS = 384
PDN_BUILDERS = {"s": pdn_small, "m": pdn_medium}
BORDERS = ("reflect", "none")
BORDER_PAD = 16  # half the PDN's receptive field: pixels the unpadded PDN loses on each side


def _hw(tile: int | tuple[int, int]) -> tuple[int, int]:
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


class EfficientAD(nn.Module):
    kind = "efficientad"
    num_maps = 2
    map_stride = 4
    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD

    def __init__(self, size: str = "s", tile: int | tuple[int, int] = 256, alpha: float = 0.5,
                 padded: bool = False, border: str = "reflect"):
        super().__init__()
        if size not in PDN_BUILDERS:
            raise ValueError(f"unknown EfficientAD size {size!r}: valid are {sorted(PDN_BUILDERS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if border not in BORDERS:
            raise ValueError(f"unknown EfficientAD border {border!r}: valid are {list(BORDERS)}")
        h, w = _hw(tile)
        if h % 32 or w % 32 or min(h, w) < 64:
            raise ValueError(f"EfficientAD tile must be divisible by 32 and at least 64, got {h} x {w}")
        self.size = size
        self.image_hw = (h, w)
        self.padded = padded
        self.border = border
        self.border_pad = BORDER_PAD if border == "reflect" and not padded else 0
        self.map_weights = (float(alpha), 1.0 - float(alpha))
        build = PDN_BUILDERS[size]
        self.teacher = build(TEACHER_CHANNELS, padded)
        self.student = build(2 * TEACHER_CHANNELS, padded)
        p = 2 * self.border_pad
        self.feature_hw = (pdn_output_size(h + p, padded), pdn_output_size(w + p, padded))
        self.autoencoder = Autoencoder(self.image_hw, self.feature_hw, TEACHER_CHANNELS)
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_trained", torch.zeros((), dtype=torch.bool))

    @property
    def map_hw(self) -> tuple[int, int]:
        return self.image_hw[0] // self.map_stride, self.image_hw[1] // self.map_stride

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.image_hw or x.shape[1] != 3:
            raise ValueError(f"EfficientAD built for 3 x {self.image_hw[0]} x {self.image_hw[1]} inputs, "
                             f"got {tuple(x.shape[1:])}; create the model with tile=(H, W)")

    @property
    def map_crop(self) -> int:
        """Map pixels per side that the feature grid lacks (4 for the unpadded PDN without border)."""
        return 4 if not self.padded and not self.border_pad else 0

    def pdn_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of teacher and student: x with its border reflected (border="reflect")."""
        p = self.border_pad
        return F.pad(x, (p, p, p, p), mode="reflect") if p else x

    def teacher_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.pdn_input(x))

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher output normalised by its channel mean/std (the regression target)."""
        return (self.teacher_raw(x) - self.teacher_mean) / self.teacher_std

    def student_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self.pdn_input(x))

    def to_map_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature-grid maps -> H/4 x W/4 (zero-pad by 4 for border="none", then resize if needed)."""
        if self.map_crop:
            c = self.map_crop
            maps = F.pad(maps, (c, c, c, c))
        if tuple(maps.shape[-2:]) != self.map_hw:
            maps = F.interpolate(maps, size=self.map_hw, mode="bilinear", align_corners=False)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        teacher = self.teacher_features(x)
        student = self.student_features(x)
        ae = self.autoencoder(x)
        map_st = ((teacher - student[:, :TEACHER_CHANNELS]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((ae - student[:, TEACHER_CHANNELS:]) ** 2).mean(dim=1, keepdim=True)
        return self.to_map_grid(torch.cat([map_st, map_ae], dim=1))
