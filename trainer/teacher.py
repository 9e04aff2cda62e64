"""The EfficientAD teacher: distillation of EfficientNet-Lite0 features into a PDN, and the teachers shipped
inside the package (trainer/assets/, each with its sha256, verified on every load).

Distillation (``distill_teacher``). A view of ``crop + 2 * CONTEXT`` pixels is cut from a random image and
strongly augmented. The unpadded PDN sees its centre ``crop`` and gives ``crop / 4 - 8`` outputs per side,
output i centred on view pixel ``CONTEXT + 16 + 4 i`` (receptive field 33 px). Lite0 sees the whole view
upsampled 2x (as EfficientAD's pretraining feeds its WideResNet twice the PDN's resolution); its taps at
strides 8 and 16 (40 + 112 = 152 channels: strides 4 and 8 of the view) are resized to the view's stride-4
grid, averaged over 3 x 3 cells (PatchCore's local aggregation), cut to the cells under the PDN's outputs
and standardised per channel (statistics of up to 256 views). So every output regresses the features of
its own place, computed with real context around it. A learned 1x1 head maps the teacher's 384 channels
to the 152 target channels (MSE there; the head is dropped afterwards). Adam with a cosine learning-rate
decay after a 2 % warm-up; batch >= 8 views.

Why the old per-product distillation stayed at a loss of ~1.0 (predicting the channel mean scores 1.0):
the Lite0 taps of the whole tile were resized onto the 56 x 56 output grid of the unpadded PDN, whose outputs
only cover the tile minus a 16 px band, so target and output were up to 16 px apart (half the receptive
field); with batch 1, lr 1e-4, 1000 steps and one product's images nothing learnable was left.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fit import (
    CheckpointError,
    Progress,
    _randint,
    _uniform,
    color_jitter,
    load_state_file,
    normalise,
    prepare_images,
)
from .models.backbones.efficientnet_lite import TAP_CHANNELS, efficientnet_lite0
from .models.efficientad import TEACHER_CHANNELS
from .models.pdn import pdn_output_size

__all__ = ["DistillConfig", "distill_teacher", "distill_views", "TeacherError", "TEACHER_FORMAT",
           "ASSETS_DIR", "shipped_teacher_path", "load_teacher", "load_shipped_teacher", "save_teacher",
           "file_sha256", "CONTEXT"]

TEACHER_FORMAT = "edge-inspect-teacher"
TEACHER_TAPS = (8, 16)  # Lite0 taps of the 2x upsampled view: strides 4 and 8 of the view
TEACHER_SCALE = 2
CONTEXT = 32  # pixels of Lite0 context around the PDN crop
PDN_MARGIN = 16  # the unpadded PDN's first output is centred 16 px into its input
ASSETS_DIR = Path(__file__).parent / "assets"


class TeacherError(CheckpointError):
    """A teacher file is missing, corrupt, fails its sha256, or does not fit the model."""


@dataclass(frozen=True)
class DistillConfig:
    crop: int = 64  # PDN input side (outputs: crop / 4 - 8 per side)
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup: float = 0.02  # share of the steps with a linear lr warm-up
    grey: float = 0.2  # probability of a grey view (mono cameras)
    seed: int = 0
    progress_every: int = 10
    time_budget: float = 0.0  # seconds; > 0: after 50 steps, cut ``steps`` to what fits the budget
    device: str = "cpu"  # torch device of the whole distillation (images, views, Lite0, PDN)

    def __post_init__(self):
        if self.crop % 4 or self.crop < 48:
            raise ValueError(f"DistillConfig: crop must be a multiple of 4 and >= 48, got {self.crop}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.grey <= 1:
            raise ValueError("DistillConfig: steps >= 0, batch_size >= 1, lr > 0 and grey in [0, 1]")


# ---------------------------------------------------------------- views and target

def _view(img: torch.Tensor, side: int, gen: torch.Generator, grey: float) -> torch.Tensor:
    """One augmented view: random resized crop (0.5-2x the side, aspect 3/4-4/3), flips, rotation up to
    30 degrees (reflection padding), colour jitter 0.4, grey with probability ``grey``: 1 x 3 x side^2."""
    img = img.float() / 255.0
    scale = side * math.exp(_uniform(math.log(0.5), math.log(2.0), gen))
    aspect = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3), gen))
    h = min(img.shape[1], max(8, round(scale / math.sqrt(aspect))))
    w = min(img.shape[2], max(8, round(scale * math.sqrt(aspect))))
    top, left = _randint(img.shape[1] - h + 1, gen), _randint(img.shape[2] - w + 1, gen)
    crop = F.interpolate(img[None, :, top:top + h, left:left + w], size=(side, side), mode="bilinear",
                         align_corners=False, antialias=True)
    for dim in (-1, -2):
        if _uniform(0, 1, gen) < 0.5:
            crop = crop.flip(dim)
    angle = math.radians(_uniform(-30, 30, gen))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], device=img.device)
    grid = F.affine_grid(theta, list(crop.shape), align_corners=False)
    crop = F.grid_sample(crop, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    crop = color_jitter(crop, gen, 0.4, all_kinds=True)
    if _uniform(0, 1, gen) < grey:
        crop = (0.299 * crop[:, :1] + 0.587 * crop[:, 1:2] + 0.114 * crop[:, 2:3]).expand(-1, 3, -1, -1)
    return crop


def distill_views(images: list[torch.Tensor], side: int, batch: int, gen: torch.Generator,
                  grey: float = 0.2) -> torch.Tensor:
    """B x 3 x side x side augmented views of random images, float in [0, 1]."""
    return torch.cat([_view(images[_randint(len(images), gen)], side, gen, grey) for _ in range(batch)])


class _DistillTarget(nn.Module):
    """Lite0 taps of the whole view (upsampled by ``scale`` first) on the view's stride-4 grid, cut to the
    cells under the PDN's outputs and standardised per channel."""

    def __init__(self, crop: int, taps: tuple[int, ...] = TEACHER_TAPS, scale: int = TEACHER_SCALE,
                 pool: int = 3):
        super().__init__()
        self.backbone = efficientnet_lite0()
        self.taps, self.scale, self.pool = tuple(taps), scale, pool
        self.grid = (crop + 2 * CONTEXT) // 4
        self.count = pdn_output_size(crop)
        # measured: at scale 1, Lite0's stride-4 cell j is centred on pixel 4 j + 3 (TF "SAME" puts odd
        # padding after); at scale 2 the stride-8 cell j on pixel 4 j + 0.5 of the view
        shift = 3.0 if scale == 1 else 0.5
        self.offset = round((CONTEXT + PDN_MARGIN - shift) / 4)
        channels = sum(TAP_CHANNELS[t] for t in self.taps)
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def raw(self, view01: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.scale != 1:
            view01 = F.interpolate(view01, scale_factor=self.scale, mode="bilinear", align_corners=False)
        feats = bb.features(normalise(view01, bb.input_mean, bb.input_std), self.taps)
        grid = torch.cat([F.interpolate(feats[t], size=(self.grid, self.grid), mode="bilinear",
                                        align_corners=False) for t in self.taps], dim=1)
        if self.pool > 1:  # local neighbourhood aggregation (PatchCore, EfficientAD's pretraining)
            grid = F.avg_pool2d(grid, self.pool, 1, self.pool // 2, count_include_pad=False)
        cut = slice(self.offset, self.offset + self.count)
        return grid[..., cut, cut]

    @torch.no_grad()
    def fit_stats(self, views: list[torch.Tensor]) -> None:
        f = torch.cat([self.raw(v).transpose(0, 1).reshape(self.mean.shape[1], -1) for v in views], dim=1)
        self.mean.copy_(f.mean(dim=1).view_as(self.mean))
        self.std.copy_(f.std(dim=1).clamp(min=1e-6).view_as(self.std))

    def forward(self, view01: torch.Tensor) -> torch.Tensor:
        return (self.raw(view01) - self.mean) / self.std


def _lr(config: DistillConfig, step: int, total: int) -> float:
    warm = max(1, round(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _fitted_steps(config: DistillConfig, done: int, seconds: float) -> int:
    """The step count that fits config.time_budget at the rate measured so far (never more than asked)."""
    return max(done, min(config.steps, int(config.time_budget * done / max(seconds, 1e-9))))


def distill_teacher(teacher: nn.Module, images: Sequence[np.ndarray], config: DistillConfig,
                    input_mean: Sequence[float], input_std: Sequence[float],
                    progress: Progress | None = None, checkpoint=None) -> dict:
    """Distil Lite0 features into ``teacher`` (an unpadded PDN with TEACHER_CHANNELS outputs), in place.

    ``input_mean/std``: the normalisation the teacher's inputs get in the model (EfficientAD: ImageNet).
    ``checkpoint(step, loss_history)``, when given, is called every 100 steps (the distil script saves).
    Returns {"loss": [...], "steps", "seconds", "target_channels"}.
    """
    side = config.crop + 2 * CONTEXT
    device = torch.device(config.device)
    tensors = [t.to(device) for t in prepare_images(images, 32)]  # smaller images' views are upscaled
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    target = _DistillTarget(config.crop).to(device)
    stat_batches = max(2, min(32, config.steps // 4))  # 256 views for real runs, fewer for short ones
    target.fit_stats([distill_views(tensors, side, 8, gen, config.grey) for _ in range(stat_batches)])
    head = nn.Conv2d(TEACHER_CHANNELS, target.mean.shape[1], 1).to(device)
    teacher.to(device).requires_grad_(True).train()
    params = list(teacher.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    history, start, c, total, step = [], time.perf_counter(), CONTEXT, config.steps, 0
    while step < total:
        if config.time_budget > 0 and step == 50:
            total = _fitted_steps(config, step, time.perf_counter() - start)
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step, total)
        view = distill_views(tensors, side, config.batch_size, gen, config.grey)
        out = head(teacher(normalise(view[..., c:-c, c:-c], input_mean, input_std)))
        loss = F.mse_loss(out, target(view))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        step += 1
        if progress is not None and (step % config.progress_every == 0 or step == total):
            progress(step, total, {"teacher_loss": history[-1]})
        if checkpoint is not None and step % 100 == 0:
            checkpoint(step, history)
    teacher.requires_grad_(False).eval().to("cpu")
    return {"loss": history, "steps": total, "seconds": time.perf_counter() - start,
            "target_channels": int(target.mean.shape[1])}


# ---------------------------------------------------------------- teacher files

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_teacher(path: str | Path, teacher: nn.Module, size: str, info: dict, half: bool = False) -> str:
    """Write a teacher file (weights fp32, or fp16 with ``half``; loads back as fp32). Returns its sha256."""
    state = {k: (v.half() if half else v.float()).cpu().contiguous() for k, v in teacher.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TEACHER_FORMAT, "version": 1, "size": size, "teacher": state,
                "info": json.dumps(info, sort_keys=True)}, path)
    return file_sha256(path)


def load_teacher(model: nn.Module, path: str | Path, sha256: str | None = None) -> dict:
    """Load a teacher file into an EfficientAD model (marks it trained). With ``sha256`` the file must
    match it. Returns the file's info dict. Raises TeacherError."""
    path = Path(path)
    if sha256 is not None and path.is_file():
        found = file_sha256(path)
        if found != sha256:
            raise TeacherError(f"teacher file {path} fails its sha256 check (expected {sha256[:16]}..., "
                               f"found {found[:16]}...): the file is corrupt or was replaced; reinstall")
    try:
        state = load_state_file(path, "teacher checkpoint", TEACHER_FORMAT,
                                "a teacher checkpoint written by `edge-train pretrain-teacher`")
    except CheckpointError as exc:
        raise TeacherError(str(exc)) from exc
    if getattr(model, "kind", None) != "efficientad" or state.get("size") != model.size:
        raise TeacherError(f"teacher checkpoint {path} is for efficientad-{state.get('size')}, "
                           f"the model is {getattr(model, 'kind', '?')}-{getattr(model, 'size', '?')}")
    try:
        model.teacher.load_state_dict({k: v.float() for k, v in state["teacher"].items()})
    except (RuntimeError, KeyError, AttributeError) as exc:
        raise TeacherError(f"teacher checkpoint {path} does not match the teacher network: {exc}") from exc
    model.teacher_trained.fill_(True)
    info = state.get("info", "{}")
    return json.loads(info) if isinstance(info, str) else {}


def _manifest() -> dict:
    path = ASSETS_DIR / "teachers.json"
    if not path.is_file():
        raise TeacherError(f"{path} is missing: the package was installed without its teacher files")
    return json.loads(path.read_text())


def shipped_teacher_path(size: str) -> tuple[Path, str]:
    """(file, sha256) of the teacher shipped for EfficientAD ``size``."""
    entry = _manifest().get("teachers", {}).get(size)
    if entry is None:
        raise TeacherError(f"no shipped teacher for EfficientAD size {size!r}: distil one with "
                           f"--teacher-steps or pass --teacher FILE")
    return ASSETS_DIR / entry["file"], entry["sha256"]


def load_shipped_teacher(model: nn.Module) -> dict:
    """Load the package's teacher for ``model.size`` after verifying its sha256."""
    path, sha = shipped_teacher_path(model.size)
    if not path.is_file():
        raise TeacherError(f"shipped teacher {path} is missing: reinstall edge-inspect")
    return load_teacher(model, path, sha)
