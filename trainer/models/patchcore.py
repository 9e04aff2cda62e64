"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
arXiv:2106.08265) on the offline EfficientNet-Lite0 backbone: a memory bank of good patch features, no
gradient training.

Patch features: the input is reflect-padded by ``pad`` pixels (the backbone's zero padding would otherwise
make every border patch unlike the interior ones, and a border patch of a test image unlike the bank),
Lite0 taps (strides 8 and 16 by default) are cropped back to the image, the coarser ones resized to the
finest grid, each averaged over an ``aggregate`` x ``aggregate`` neighbourhood (the paper's local
aggregation), L2-normalised per layer so that every layer counts the same whatever its channel count and
scale, and concatenated. Optionally the patch's position joins the feature (``position_weight`` > 0:
|y|, |x| in [0, 1] from the tile centre, mirror-symmetric) for aligned parts whose normal look depends on
where it is.

Memory bank (``fit_bank``): every patch of the training tiles is pooled (a seeded random subset of at most
``pool_size``), and a greedy k-center coreset (paper, Algorithm 1; selection on a seeded random projection to
``projection_dim`` dimensions) keeps ``bank_fraction`` of the pool, at least ``min_bank`` patches.

Map: the distance of each patch to its nearest bank entry, ``sqrt(max(|f|^2 - 2 f.m + |m|^2, 0))`` minimised
over the bank: one matrix product inside the exported graph, so every engine (ONNX Runtime, OpenVINO, torch,
TensorRT, Triton) runs it; resized to H/4 x W/4. ``knn`` > 1 averages the k nearest distances.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import TAP_CHANNELS, efficientnet_lite0

__all__ = ["PatchCore", "greedy_coreset"]


def greedy_coreset(features: torch.Tensor, count: int, projection_dim: int = 32,
                   seed: int = 0) -> torch.Tensor:
    """Indices of ``count`` rows of N x C ``features`` chosen by greedy k-center selection (each new centre
    is the row farthest from those chosen so far), distances measured on a seeded random projection."""
    n = features.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {count}")
    gen = torch.Generator().manual_seed(seed)
    z = features.float()
    if projection_dim and projection_dim < z.shape[1]:
        z = z @ (torch.randn(z.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim))
    z = z.contiguous()
    squared = (z * z).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(0, n, (1,), generator=gen))
    # |z - c|^2 = |z|^2 - 2 z.c + |c|^2: one matrix-vector product per step into reused buffers (an N x C
    # difference tensor per step made the 10 % coreset of a 100k pool take minutes)
    nearest = squared - 2.0 * (z @ z[chosen[0]]) + squared[chosen[0]]
    distance = torch.empty_like(nearest)
    for i in range(1, count):
        c = int(torch.argmax(nearest))
        chosen[i] = c
        torch.mv(z, z[c], out=distance)
        distance.mul_(-2.0).add_(squared).add_(squared[c])
        torch.minimum(nearest, distance, out=nearest)
    return chosen


class PatchCore(nn.Module):
    kind = "patchcore"
    num_maps = 1
    map_stride = 4
    map_weights = (1.0,)
    fits_without_training = True  # the bank builds in seconds: calibration cross-fits it (crossfit.py)

    def __init__(self, size: str = "s", taps: tuple[int, ...] = (8, 16), aggregate: int = 3, pad: int = 32,
                 bank_fraction: float = 0.1, min_bank: int = 1024, pool_size: int = 100_000,
                 projection_dim: int = 32, knn: int = 1, position_weight: float = 0.0, seed: int = 0,
                 backbone_weights: str | None = None, pretrained: bool = True):
        super().__init__()
        if size != "s":
            raise ValueError(f"unknown PatchCore size {size!r}: valid are ['s']")
        unknown = [t for t in taps if t not in TAP_CHANNELS]
        if unknown or not taps:
            raise ValueError(f"PatchCore taps {list(taps)} invalid: choose from {sorted(TAP_CHANNELS)}")
        checks = [(aggregate >= 1 and aggregate % 2 == 1, "aggregate must be an odd number >= 1"),
                  (pad >= 0 and pad % max(taps) == 0, "pad must be a multiple of the largest tap stride"),
                  (0 < bank_fraction <= 1, "bank_fraction must be in (0, 1]"),
                  (min_bank >= 1 and pool_size >= 1, "min_bank and pool_size must be >= 1"),
                  (knn >= 1, "knn must be >= 1"), (position_weight >= 0, "position_weight must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"PatchCore: {msg}")
        self.size, self.taps = size, tuple(sorted(taps))
        self.aggregate, self.pad, self.knn = int(aggregate), int(pad), int(knn)
        self.bank_fraction, self.min_bank = float(bank_fraction), int(min_bank)
        self.pool_size, self.projection_dim = int(pool_size), int(projection_dim)
        self.position_weight, self.seed = float(position_weight), int(seed)
        # optional {tile digest: patch features} shared between refits of one calibration (trainer/cli.py):
        # cross-fitted banks reuse the backbone's work instead of recomputing it for every fold
        self.feature_cache: dict[bytes, torch.Tensor] | None = None
        self.backbone = efficientnet_lite0(backbone_weights, pretrained=pretrained, frozen=True)
        self.input_mean, self.input_std = self.backbone.input_mean, self.backbone.input_std
        self.feature_dim = sum(TAP_CHANNELS[t] for t in self.taps) + (2 if position_weight > 0 else 0)
        self.register_buffer("bank", torch.zeros(0, self.feature_dim))

    def train(self, mode: bool = True) -> PatchCore:
        return super().train(False)  # nothing here trains by gradient; BN stays in eval

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "bank")
        if saved is not None and saved.shape != self.bank.shape:
            self.bank = torch.zeros_like(saved)  # a fitted bank of any size loads into a fresh model
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def stride(self) -> int:
        return self.taps[0]

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x h x w patch features at stride ``taps[0]`` (h = ceil(H / stride))."""
        top = self.taps[-1]
        side = min(int(x.shape[-2]), int(x.shape[-1]))
        p = min(self.pad, (side - 1) // top * top)  # reflection padding needs p < side
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        feats = self.backbone.features(x, self.taps)
        grid = None
        layers = []
        for t in self.taps:
            f = feats[t]
            if p:
                c = p // t
                f = f[:, :, c:f.shape[-2] - c, c:f.shape[-1] - c]
            if grid is None:
                grid = tuple(f.shape[-2:])
            elif tuple(f.shape[-2:]) != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            if self.aggregate > 1:
                f = F.avg_pool2d(f, self.aggregate, 1, self.aggregate // 2, count_include_pad=False)
            layers.append(F.normalize(f, dim=1))
        if self.position_weight > 0:
            b, _, h, w = layers[0].shape
            ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).abs().view(1, 1, h, 1).expand(b, 1, h, w)
            xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).abs().view(1, 1, 1, w).expand(b, 1, h, w)
            layers.append(torch.cat([ys, xs], dim=1) * self.position_weight)
        return torch.cat(layers, dim=1)

    def _bank_features(self, batch: torch.Tensor) -> torch.Tensor:
        """patch_features of a training batch, through ``feature_cache`` when one is set."""
        cache = self.feature_cache
        if cache is None:
            return self.patch_features(batch)
        keys = [hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=16).digest() for t in batch]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            for i, f in zip(missing, self.patch_features(batch[missing]), strict=True):
                cache[keys[i]] = f
        return torch.stack([cache[k] for k in keys])

    @torch.no_grad()
    def fit_bank(self, batches) -> dict:
        """Build the memory bank from an iterable of normalised B x 3 x H x W training batches."""
        pooled = [self._bank_features(b).permute(0, 2, 3, 1).reshape(-1, self.feature_dim) for b in batches]
        if not pooled:
            raise ValueError("PatchCore: no training images to build the memory bank from")
        pool = torch.cat(pooled)
        total = pool.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        if total > self.pool_size:
            pool = pool[torch.randperm(total, generator=gen)[: self.pool_size]]
        count = min(pool.shape[0], max(self.min_bank, round(self.bank_fraction * pool.shape[0])))
        keep = greedy_coreset(pool, count, self.projection_dim, self.seed) if count < pool.shape[0] else None
        self.bank = (pool if keep is None else pool[keep]).contiguous()
        return {"bank": int(self.bank.shape[0]), "patches": int(total), "pool": int(pool.shape[0])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise RuntimeError("PatchCore memory bank is empty: fit it first (trainer.fit.fit)")
        f = self.patch_features(x)
        b, c, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(b, h * w, c)
        d2 = (q * q).sum(-1, keepdim=True) - 2.0 * (q @ self.bank.t()) + (self.bank * self.bank).sum(-1)
        if self.knn == 1:
            nearest = d2.min(dim=-1).values
        else:
            nearest = d2.topk(self.knn, dim=-1, largest=False).values.clamp(min=0).sqrt().mean(-1)
        dist = nearest.clamp(min=0).sqrt() if self.knn == 1 else nearest
        out_hw = (int(x.shape[-2]) // self.map_stride, int(x.shape[-1]) // self.map_stride)
        return F.interpolate(dist.view(b, 1, h, w), size=out_hw, mode="bilinear", align_corners=False)
