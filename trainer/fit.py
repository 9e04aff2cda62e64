"""Training loops: ``fit`` (EfficientAD student + autoencoder, DFR autoencoder, reconstruction AE, MKD cloner,
TSDN; saliency is zero-shot) and ``pretrain_teacher``.

Seeded and reproducible on CPU: one torch.Generator draws the data (crops, augmentation, synthetic
anomalies) and the global torch RNG (dropout) is seeded; both states go into checkpoints, so a resumed run
continues exactly like an uninterrupted one. Checkpoints (torch.save, read with weights_only=True) hold the
model state, the optimiser state, the step and both RNG states.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .data.superpixels import random_fill
from .models.dfr import pca_latent_dim
from .models.efficientad import TEACHER_CHANNELS

__all__ = ["TrainConfig", "CheckpointError", "fit", "pretrain_teacher", "read_checkpoint", "restore_model",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "edge-inspect-checkpoint"
CHECKPOINT_VERSION = 1
Progress = Callable[[int, int, dict], None]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to the model being trained."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 70_000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_drop_at: float = 0.95  # fraction of steps after which lr is multiplied by 0.1
    seed: int = 0
    teacher_steps: int = 10_000  # EfficientAD teacher distillation when the teacher is not trained yet
    synthetic_anomalies: bool = False  # noise patches, 1-4 per image, on 40 % of images
    cdo: bool = False  # collaborative discrepancy optimisation instead of the hard feature loss
    penalty_images: tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)
    checkpoint_path: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end, when a path is given)
    resume: bool = False  # continue from checkpoint_path when it exists
    tile: int = 256  # square crop size taken from the training images
    progress_every: int = 10
    hard_quantile: float = 0.999
    pca_variance: float = 0.9  # DFR latent size: explained variance of the training features
    pca_samples: int = 16  # DFR: training crops whose features feed the PCA
    time_budget: float = 0.0  # seconds for the whole fit() call; > 0: steps is only an upper bound
    val_every: int = 0  # steps between validation checks (0: a 20th of the run)
    val_crops: int = 8  # fixed crops of the validation images scored at each check
    patience: int = 5  # checks without improvement before stopping early
    min_delta: float = 0.01  # relative improvement that counts

    def __post_init__(self):
        checks = [(self.steps >= 0, "steps must be >= 0"), (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.lr > 0, "lr must be > 0"), (0 < self.lr_drop_at <= 1, "lr_drop_at must be in (0, 1]"),
                  (self.teacher_steps >= 0, "teacher_steps must be >= 0"),
                  (self.tile >= 32, "tile must be >= 32"),
                  (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
                  (self.time_budget >= 0, "time_budget must be >= 0"),
                  (self.val_every >= 0 and self.val_crops >= 1 and self.patience >= 1,
                   "val_every >= 0, val_crops >= 1 and patience >= 1"),
                  (self.progress_every >= 1, "progress_every must be >= 1"),
                  (0 < self.hard_quantile < 1, "hard_quantile must be in (0, 1)"),
                  (0 < self.pca_variance <= 1, "pca_variance must be in (0, 1]"),
                  (not (self.resume and self.checkpoint_path is None), "resume needs checkpoint_path")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")


# ---------------------------------------------------------------- images and augmentation (pure functions)

def _to_tensor(image: np.ndarray, tile: int, index: int) -> torch.Tensor:
    """uint8 H x W (x 1|3) -> uint8 3 x H x W tensor; images smaller than the tile are refused."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"training image {index}: expected a uint8 numpy array, got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"training image {index}: expected H x W x C with C 1 or 3, got {image.shape}")
    if image.shape[0] < tile or image.shape[1] < tile:
        raise ValueError(f"training image {index} is {image.shape[0]} x {image.shape[1]}, smaller than the "
                         f"tile {tile}: resize it or lower TrainConfig.tile")
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def prepare_images(images: Sequence[np.ndarray], tile: int) -> list[torch.Tensor]:
    if len(images) == 0:
        raise ValueError("no training images")
    return [_to_tensor(img, tile, i) for i, img in enumerate(images)]


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=gen)) if high > 1 else 0


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def sample_batch(images: list[torch.Tensor], tile: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random tile crops of random images: B x 3 x tile x tile float in [0, 1]."""
    out = []
    for _ in range(batch):
        img = images[_randint(len(images), gen)]
        top, left = _randint(img.shape[1] - tile + 1, gen), _randint(img.shape[2] - tile + 1, gen)
        out.append(img[:, top:top + tile, left:left + tile])
    return torch.stack(out).float() / 255.0


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = 0.2, all_kinds: bool = False):
    """Brightness / contrast / saturation by a factor in [1-s, 1+s]: one kind (EfficientAD) or all in turn."""
    kinds = [0, 1, 2] if all_kinds else [_randint(3, gen)]
    for kind in kinds:
        f = _uniform(1 - strength, 1 + strength, gen)
        if kind == 0:
            x = x * f
        elif kind == 1:
            x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * f + x.mean(dim=(1, 2, 3), keepdim=True)
        else:
            grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - grey) * f + grey
    return x.clamp(0.0, 1.0)


def inject_noise_patches(x: torch.Tensor, gen: torch.Generator, fraction: float = 0.4,
                         max_patches: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies: on ``fraction`` of the images, 1..max_patches uniform-noise rectangles
    (side 1/16 to 1/4 of the tile). Returns the images and a B x 1 x H x W float mask of the injected
    pixels."""
    x = x.clone()
    mask = torch.zeros(x.shape[0], 1, *x.shape[-2:])
    hh, ww = x.shape[-2:]
    for b in range(x.shape[0]):
        if _uniform(0, 1, gen) >= fraction:
            continue
        for _ in range(1 + _randint(max_patches, gen)):
            ph, pw = (max(2, round(s * _uniform(1 / 16, 1 / 4, gen))) for s in (hh, ww))
            top, left = _randint(hh - ph + 1, gen), _randint(ww - pw + 1, gen)
            x[b, :, top:top + ph, left:left + pw] = torch.rand(3, ph, pw, generator=gen)
            mask[b, :, top:top + ph, left:left + pw] = 1.0
    return x, mask


# ---------------------------------------------------------------- checkpoints

def _save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                     total: int, gen: torch.Generator, history: list[float]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": model.kind,
             "size": model.size, "step": step, "total_steps": total, "model": model.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else {},
             "torch_rng": torch.get_rng_state(),
             "data_rng": gen.get_state(), "loss": torch.tensor(history, dtype=torch.float64),
             "latent": getattr(model, "latent", None) or 0}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)


def load_state_file(path: str | Path, what: str, state_format: str, expected: str) -> dict:
    """torch.load a dict of ``state_format`` (weights_only: no arbitrary pickle), else CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != state_format:
        raise CheckpointError(f"{what} {path} is not {expected}")
    return state


def read_checkpoint(path: str | Path) -> dict:
    """Load and validate a training checkpoint. Raises CheckpointError."""
    state = load_state_file(path, "checkpoint", CHECKPOINT_FORMAT, "an edge-inspect training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, "
                              f"this build reads {CHECKPOINT_VERSION}")
    return state


def restore_model(model: nn.Module, state: dict) -> nn.Module:
    """Load a checkpoint's model state (building DFR's autoencoder with the stored latent size first)."""
    if state["kind"] != model.kind or state["size"] != model.size:
        raise CheckpointError(f"checkpoint holds a {state['kind']}-{state['size']} model, "
                              f"not {model.kind}-{model.size}")
    if model.kind == "dfr" and state.get("latent") and model.latent != state["latent"]:
        model.build_autoencoder(int(state["latent"]))
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match the model's architecture: {exc}") from exc
    return model


# ---------------------------------------------------------------- EfficientAD

def _require_efficientad(model: nn.Module, tile: int) -> None:
    if getattr(model, "kind", None) != "efficientad":
        raise ValueError(f"expected an EfficientAD model, got {getattr(model, 'kind', type(model).__name__)}")
    if model.image_hw != (tile, tile):
        raise ValueError(f"model built for {model.image_hw} inputs but TrainConfig.tile is {tile}: "
                         f"create it with tile={tile}")


@torch.no_grad()
def teacher_statistics(model: nn.Module, images: list[torch.Tensor], tile: int) -> None:
    """Set the teacher's channel mean/std buffers from non-overlapping tile crops of the images."""
    mean, std = model.input_mean, model.input_std
    outs = []
    for img in images:
        for top in range(0, img.shape[1] - tile + 1, tile):
            for left in range(0, img.shape[2] - tile + 1, tile):
                x = normalise(img[None, :, top:top + tile, left:left + tile].float() / 255.0, mean, std)
                outs.append(model.teacher_raw(x).transpose(0, 1).reshape(TEACHER_CHANNELS, -1))
    f = torch.cat(outs, dim=1)
    model.teacher_mean.copy_(f.mean(dim=1).view_as(model.teacher_mean))
    model.teacher_std.copy_(f.std(dim=1).clamp(min=1e-6).view_as(model.teacher_std))


def pretrain_teacher(model: nn.Module, images: Sequence[np.ndarray], config: TrainConfig,
                     progress: Progress | None = None) -> dict:
    """Distil EfficientNet-Lite0 features into the EfficientAD teacher PDN (trainer.teacher.distill_teacher)
    on 64 px crops (the PDN is fully convolutional: the crop need not be the tile) with
    config.teacher_steps / batch_size / lr / seed, continuing from the teacher's current weights, then set
    its channel statistics on tiles of the images."""
    from .teacher import DistillConfig, distill_teacher  # teacher.py builds on this module's helpers

    _require_efficientad(model, config.tile)
    if model.padded:
        raise ValueError("teacher distillation needs the unpadded PDN (padded=False)")
    dc = DistillConfig(crop=64, steps=config.teacher_steps, batch_size=config.batch_size,
                       lr=config.lr, weight_decay=config.weight_decay, seed=config.seed,
                       progress_every=config.progress_every)
    summary = distill_teacher(model.teacher, images, dc, model.input_mean, model.input_std, progress)
    teacher_statistics(model, prepare_images(images, config.tile), config.tile)
    model.teacher_trained.fill_(True)
    return summary


def _feature_mask(mask: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Image-resolution anomaly mask -> the student/teacher feature grid (any injected pixel counts)."""
    m = F.max_pool2d(mask, model.map_stride)
    if model.map_crop:
        m = m[..., model.map_crop:-model.map_crop, model.map_crop:-model.map_crop]
    if tuple(m.shape[-2:]) != model.feature_hw:
        m = F.interpolate(m, size=model.feature_hw, mode="nearest")
    return m


def _efficientad_step(model: nn.Module, x01: torch.Tensor, config: TrainConfig, gen: torch.Generator,
                      penalty: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    mean, std = model.input_mean, model.input_std
    parts: dict[str, torch.Tensor] = {}
    x_st, mask = (inject_noise_patches(x01, gen) if config.synthetic_anomalies
                  else (x01, torch.zeros(x01.shape[0], 1, *x01.shape[-2:])))
    x = normalise(x_st, mean, std)
    with torch.no_grad():
        teacher = model.teacher_features(x)
    student = model.student_features(x)[:, :TEACHER_CHANNELS]
    fmask = _feature_mask(mask, model)
    d = ((teacher - student) ** 2).mean(dim=1, keepdim=True)
    if config.cdo:
        parts["st"] = losses.cdo_loss(d, fmask if config.synthetic_anomalies else None)
    else:
        normal = (fmask <= 0.5).expand_as(teacher)
        parts["st"] = losses.hard_feature_loss(teacher[normal], student[normal], config.hard_quantile)
        if config.synthetic_anomalies:
            parts["push"] = losses.anomaly_push_loss(d, fmask)
    if penalty:
        p = sample_batch(penalty, config.tile, 1, gen)
        student_p = model.student_features(normalise(p, mean, std))
        parts["penalty"] = losses.penalty_loss(student_p[:, :TEACHER_CHANNELS])
    x_ae = normalise(color_jitter(x01, gen), mean, std)
    ae = model.autoencoder(x_ae)
    with torch.no_grad():
        teacher_ae = model.teacher_features(x_ae)
    parts["ae"] = losses.ae_loss(teacher_ae, ae)
    parts["stae"] = losses.student_ae_loss(ae, model.student_features(x_ae)[:, TEACHER_CHANNELS:])
    return parts


def _efficientad_setup(model: nn.Module, tensors: list[torch.Tensor], images, config: TrainConfig,
                       progress: Progress | None, resumed: bool, info: dict) -> list[nn.Parameter]:
    _require_efficientad(model, config.tile)
    if not resumed:
        if config.teacher_steps > 0:
            info["teacher"] = pretrain_teacher(model, images, config, progress)
        else:
            teacher_statistics(model, tensors, config.tile)
            info["teacher"] = {"steps": 0, "pretrained": bool(model.teacher_trained)}
    model.teacher.requires_grad_(False).eval()
    return list(model.student.parameters()) + list(model.autoencoder.parameters())


# ---------------------------------------------------------------- DFR

def _dfr_step(model: nn.Module, x01: torch.Tensor, config: TrainConfig, gen: torch.Generator,
              penalty: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    f = model.regional_features(normalise(x01, model.input_mean, model.input_std))
    return {"mse": losses.dfr_loss(f, model.autoencoder(f))}


def _dfr_setup(model: nn.Module, tensors: list[torch.Tensor], images, config: TrainConfig,
               progress: Progress | None, resumed: bool, info: dict) -> list[nn.Parameter]:
    """Per-channel feature statistics (when the model standardises) and the PCA latent size, from the
    regional features of ``config.pca_samples`` training crops; both are kept when resuming."""
    if model.autoencoder is None or (model.standardise and not bool(model.stats_set) and not resumed):
        gen = torch.Generator().manual_seed(config.seed + 2)
        feats = [model.raw_regional_features(normalise(sample_batch(tensors, config.tile, 1, gen),
                                                       model.input_mean, model.input_std))
                 for _ in range(config.pca_samples)]
        flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats])
        if model.standardise:
            model.set_feature_stats(flat)
            flat = (flat - model.feature_mean.view(1, -1)) / model.feature_std.view(1, -1)
        if model.autoencoder is None:
            latent = pca_latent_dim(flat, config.pca_variance)
            torch.manual_seed(config.seed)
            model.build_autoencoder(latent)
    info["latent"] = model.latent
    return list(model.autoencoder.parameters())


# ---------------------------------------------------------------- reconstruction AE, MKD, TSDN, saliency

def _all_parameters(model: nn.Module, tensors, images, config: TrainConfig, progress: Progress | None,
                    resumed: bool, info: dict) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _reconstruction_step(model: nn.Module, x01: torch.Tensor, config: TrainConfig, gen: torch.Generator,
                         penalty: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    x = normalise(x01, model.input_mean, model.input_std)
    return {"mse": losses.reconstruction_loss(x, model.reconstruct(x))}


def _mkd_setup(model: nn.Module, tensors: list[torch.Tensor], images, config: TrainConfig,
               progress: Progress | None, resumed: bool, info: dict) -> list[nn.Parameter]:
    if not resumed and not bool(model.stats_set):
        gen = torch.Generator().manual_seed(config.seed + 2)
        model.set_expert_stats([normalise(sample_batch(tensors, config.tile, 1, gen), model.input_mean,
                                          model.input_std) for _ in range(config.pca_samples)])
    return list(model.cloner.parameters())


def _mkd_step(model: nn.Module, x01: torch.Tensor, config: TrainConfig, gen: torch.Generator,
              penalty: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs = model.pairs(normalise(x01, model.input_mean, model.input_std))
    return losses.mkd_loss(pairs, model.direction_weight)


def superpixel_fill_batch(x01: torch.Tensor, gen: torch.Generator, probability: float = 0.5,
                          n_segments: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """TSDN fake anomalies: on ``probability`` of the images, SLIC superpixels painted with random colours
    (trainer.data.superpixels.random_fill, SLIC at half resolution). Returns images and B x 1 x H x W mask."""
    out, masks = [], []
    for img in x01:
        if _uniform(0, 1, gen) >= probability:
            out.append(img)
            masks.append(torch.zeros(1, *img.shape[-2:]))
            continue
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        u8 = (img.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        filled, mask = random_fill(u8, rng, n_segments=n_segments, slic_scale=0.5)
        out.append(torch.from_numpy(filled).permute(2, 0, 1).float() / 255.0)
        masks.append(torch.from_numpy(mask)[None])
    return torch.stack(out), torch.stack(masks)


def _tsdn_step(model: nn.Module, x01: torch.Tensor, config: TrainConfig, gen: torch.Generator,
               penalty: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    filled, mask = superpixel_fill_batch(x01, gen, model.srf_probability, model.srf_segments)
    streams = model.streams(normalise(filled, model.input_mean, model.input_std))
    return losses.tsdn_loss(streams, normalise(x01, model.input_mean, model.input_std), mask)


def tile_crops(image: torch.Tensor, tile: int, stride: int) -> list[torch.Tensor]:
    """Tiles covering a 3 x H x W image the way evaluation and the daemon do (origins on the map stride)."""
    from .evaluate import tile_starts

    return [image[:, y:y + tile, x:x + tile] for y in tile_starts(image.shape[1], tile, stride)
            for x in tile_starts(image.shape[2], tile, stride)]


def _patchcore_setup(model: nn.Module, tensors: list[torch.Tensor], images, config: TrainConfig,
                     progress: Progress | None, resumed: bool, info: dict) -> list[nn.Parameter]:
    """Build the memory bank from every tile of every training image (no gradient steps)."""
    if resumed and model.bank.shape[0]:
        info["bank"] = int(model.bank.shape[0])
        return []
    start = time.perf_counter()
    crops = [c for t in tensors for c in tile_crops(t, config.tile, model.map_stride)]
    size = max(1, config.batch_size)

    def batches():
        for i in range(0, len(crops), size):
            yield normalise(torch.stack(crops[i:i + size]).float() / 255.0, model.input_mean, model.input_std)
            if progress is not None:
                progress(min(i + size, len(crops)), len(crops), {"bank": "features"})

    info.update(model.fit_bank(batches()), tiles=len(crops))
    info["bank_seconds"] = round(time.perf_counter() - start, 2)
    return []


def _no_training(model: nn.Module, tensors, images, config: TrainConfig, progress: Progress | None,
                 resumed: bool, info: dict) -> list[nn.Parameter]:
    info["zero_shot"] = True
    return []


_TRAINERS = {"efficientad": (_efficientad_setup, _efficientad_step), "dfr": (_dfr_setup, _dfr_step),
             "reconstruction": (_all_parameters, _reconstruction_step), "mkd": (_mkd_setup, _mkd_step),
             "tsdn": (_all_parameters, _tsdn_step), "saliency": (_no_training, None),
             "patchcore": (_patchcore_setup, None)}


# ---------------------------------------------------------------- the loop

def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total: int) -> None:
    factor = 0.1 if step >= int(config.lr_drop_at * total) else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor


def _report(progress: Progress | None, step: int, total: int, config: TrainConfig, info: dict) -> None:
    if progress is not None and (step % config.progress_every == 0 or step == total):
        progress(step, total, info)


class _Schedule:
    """The step count: config.steps, or with a time budget what fits in it at the rate measured so far
    (re-estimated at every validation; the lr drop and the progress total follow it)."""

    def __init__(self, config: TrainConfig, start_step: int, started: float):
        self.config, self.start_step, self.started = config, start_step, started
        self.budget = config.time_budget
        self.total = config.steps
        self.loop_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, step: int) -> None:
        """Re-estimate ``total`` from the rate of the steps done in this run (needs a budget)."""
        done = step - self.start_step
        if self.budget <= 0 or done < 5:
            return
        rate = (time.perf_counter() - self.loop_start) / done
        left = max(0.0, self.budget - self.elapsed())
        self.total = max(step + 1, min(self.config.steps, step + int(left / rate)))

    def over(self, step: int) -> bool:
        """Done: the step count is reached, or the budget is spent (after at least one step)."""
        spent = self.budget > 0 and self.elapsed() >= self.budget and step > self.start_step
        return step >= self.total or spent

    def info(self) -> dict:
        return {"budget_s": self.budget, "elapsed_s": self.elapsed()} if self.budget > 0 else {}


class _Validator:
    """Early stopping on held-out good images: the training loss terms on fixed crops (same seed every
    time, no gradient, eval mode); keeps the best weights; ``stop`` after ``patience`` checks without a
    relative improvement of ``min_delta``."""

    def __init__(self, model: nn.Module, step_fn, images: Sequence[np.ndarray], config: TrainConfig):
        self.model, self.step_fn, self.config = model, step_fn, config
        gen = torch.Generator().manual_seed(config.seed + 3)
        tensors = prepare_images(images, config.tile)
        self.batches = [sample_batch(tensors, config.tile, 1, gen) for _ in range(config.val_crops)]
        self.best, self.best_state, self.best_step, self.bad = math.inf, None, 0, 0
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def score(self) -> float:
        self.model.eval()
        gen = torch.Generator().manual_seed(self.config.seed + 4)
        total = sum(float(sum(self.step_fn(self.model, b, self.config, gen, []).values()))
                    for b in self.batches)
        self.model.train()
        return total / len(self.batches)

    def check(self, step: int) -> bool:
        """Score now; True when training should stop (no improvement for ``patience`` checks)."""
        value = self.score()
        self.history.append((step, value))
        if value < self.best * (1 - self.config.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.config.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def _val_every(config: TrainConfig, total: int, start_step: int) -> int:
    return config.val_every or max(10, (total - start_step) // 20)


def _resume(state: dict | None, optimizer: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, list]:
    if state is None:
        return 0, []
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint optimiser state does not match: {exc}") from exc
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["data_rng"])
    return int(state["step"]), state["loss"].tolist()


def _train_step(model, step_fn, optimizer, batch, config, gen, penalty, history, parts) -> None:
    terms = step_fn(model, batch, config, gen, penalty)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    history.append(float(loss.detach()))
    for name, value in terms.items():
        parts.setdefault(name, []).append(float(value.detach()))


def fit(model: nn.Module, images: Sequence[np.ndarray], config: TrainConfig,
        progress: Progress | None = None, val_images: Sequence[np.ndarray] | None = None,
        stop: Callable[[], bool] | None = None) -> dict:
    """Train ``model`` on good images (uint8 H x W x C, C 1 or 3) with random ``config.tile`` crops.

    EfficientAD: distils the teacher first when config.teacher_steps > 0 (from its current weights), then
    trains student and autoencoder. DFR: picks the latent size by PCA (unless the model has one), then trains
    the autoencoder. Reconstruction: the autoencoder (MSE). MKD: sets the expert's channel statistics, then
    trains the cloner. TSDN: encoder, FNE and both decoders on superpixel-filled crops. Saliency: zero-shot,
    returns at once (steps 0; the checkpoint is still written).
    Length: config.steps, or with config.time_budget (seconds, counted from the call) the steps that fit.
    With ``val_images`` (held-out good images) the validation loss is checked every config.val_every steps
    (0: a 20th of the run); training stops after config.patience checks without improvement and the best
    weights are kept. ``stop()`` returning True (a signal handler's flag) ends training after the current
    step: the checkpoint is written and the result says "interrupted". With ``resume`` and an existing
    ``checkpoint_path`` training continues from the checkpoint.
    Returns {"loss": [...], "parts": {name: [...]}, "steps", "seconds", "start_step", "stopped", ...}.
    """
    started = time.perf_counter()
    kind = getattr(model, "kind", None)
    if kind not in _TRAINERS:
        raise ValueError(f"fit: unsupported model kind {kind!r}: valid are {sorted(_TRAINERS)}")
    setup, step_fn = _TRAINERS[kind]
    tensors = prepare_images(images, config.tile)
    penalty = prepare_images(config.penalty_images, config.tile) if config.penalty_images else []
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    state = None
    if config.resume and Path(config.checkpoint_path).is_file():
        state = read_checkpoint(config.checkpoint_path)
        restore_model(model, state)
    info: dict = {}
    params = setup(model, tensors, images, config, progress, state is not None, info)
    if step_fn is None:  # no gradient steps (saliency: zero-shot; patchcore: the bank built in setup)
        model.eval()
        if config.checkpoint_path:
            _save_checkpoint(config.checkpoint_path, model, None, 0, 0, gen, [])
        return {"loss": [], "parts": {}, "steps": 0, "start_step": 0,
                "seconds": float(info.get("bank_seconds", 0.0)), "kind": kind,
                "stopped": "zero-shot" if info.get("zero_shot") else "bank", **info}
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    start_step, history = _resume(state, optimizer, gen)
    parts: dict[str, list[float]] = {}
    validator = _Validator(model, step_fn, val_images, config) if val_images else None
    schedule = _Schedule(config, start_step, started)
    model.train()
    step, stopped = start_step, "steps"
    while True:
        if stop is not None and stop():
            stopped = "interrupted"
            break
        if schedule.over(step):
            stopped = "budget" if step < config.steps else "steps"
            break
        _set_lr(optimizer, config, step, schedule.total)
        batch = sample_batch(tensors, config.tile, config.batch_size, gen)
        _train_step(model, step_fn, optimizer, batch, config, gen, penalty, history, parts)
        step += 1
        if (step - start_step) in (5, 20) or (step - start_step) % 50 == 0:
            schedule.update(step)
        due = (step - start_step) % _val_every(config, schedule.total, start_step) == 0
        if validator is not None and due:
            if validator.check(step):
                stopped = "early"
                break
        _report(progress, step, schedule.total, config, {"loss": history[-1], **schedule.info()})
        every = config.checkpoint_every
        if config.checkpoint_path and every and step % every == 0:
            _save_checkpoint(config.checkpoint_path, model, optimizer, step, schedule.total, gen, history)
    if validator is not None:
        if not validator.history or validator.history[-1][0] != step:
            validator.check(step)
        validator.restore_best()
        info["validation"] = {"best_step": validator.best_step, "best_loss": validator.best,
                              "checks": validator.history}
    model.eval()
    if config.checkpoint_path:
        _save_checkpoint(config.checkpoint_path, model, optimizer, step, max(step, schedule.total), gen,
                         history)
    return {"loss": history, "parts": parts, "steps": step, "start_step": start_step,
            "seconds": time.perf_counter() - started, "kind": kind, "stopped": stopped, **info}
