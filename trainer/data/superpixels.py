"""SLIC superpixels (Achanta et al., TPAMI 2012) in NumPy/OpenCV, and superpixel random filling (TSDN).

``slic`` clusters pixels by k-means over (Lab colour, x, y) starting from a regular grid of seeds. Each pixel
only competes between the seeds of its own grid cell and the 8 cells around it (the 2S x 2S window of the
paper, vectorised), so an iteration is 9 distance maps. Afterwards every label keeps only its largest
4-connected piece; the other pieces take the label of a neighbouring pixel, so the labels are connected.

``random_fill`` is the "superpixel random filling" of TSDN: a random subset of superpixels is painted with
random colours (grey levels for grey images), giving realistic-shaped fake anomalies and their mask.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["slic", "random_fill"]


def _lab(image: np.ndarray) -> np.ndarray:
    """uint8 H x W (x 1|3) RGB/grey -> float32 H x W x 3 CIE Lab (L in 0..100)."""
    if image.dtype != np.uint8:
        raise ValueError(f"slic expects a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"slic expects H x W, H x W x 1 or H x W x 3, got {image.shape}")
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2Lab).astype(np.float32)  # 8-bit Lab
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab


def _assign(lab, yy, xx, cell, centres, grid, spatial_weight):
    """Label (flat seed index) of each pixel: nearest of the seeds of its 3 x 3 grid-cell neighbourhood."""
    ny, nx = grid
    best = np.full(yy.shape, np.inf, np.float32)
    label = np.zeros(yy.shape, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cy, cx = cell[0] + dy, cell[1] + dx
            valid = (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)
            idx = np.clip(cy, 0, ny - 1) * nx + np.clip(cx, 0, nx - 1)
            c = centres[idx]
            d = ((lab - c[..., :3]) ** 2).sum(-1)
            d = d + spatial_weight * ((yy - c[..., 3]) ** 2 + (xx - c[..., 4]) ** 2)
            d = np.where(valid, d, np.inf)
            closer = d < best
            best = np.where(closer, d, best)
            label = np.where(closer, idx, label)
    return label


def _update(lab, yy, xx, label, centres):
    n = centres.shape[0]
    flat = label.ravel()
    counts = np.bincount(flat, minlength=n).astype(np.float32)
    feats = np.concatenate([lab.reshape(-1, 3), yy.reshape(-1, 1), xx.reshape(-1, 1)], axis=1)
    sums = np.stack([np.bincount(flat, weights=feats[:, k], minlength=n) for k in range(5)], axis=1)
    keep = counts > 0
    out = centres.copy()
    out[keep] = (sums[keep] / counts[keep, None]).astype(np.float32)
    return out


def _enforce_connectivity(label: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected piece of every label; other pieces take a neighbour's label."""
    out = label.copy()
    for value in np.unique(label):
        mask = (label == value).astype(np.uint8)
        count, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        if count > 2:
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            out[(comp > 0) & (comp != largest)] = -1
    while (out < 0).any():
        for shifted_src, shifted_dst in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                                         ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                                         ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                                         ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
            dst, src = out[shifted_dst], out[shifted_src]
            fill = (dst < 0) & (src >= 0)
            dst[fill] = src[fill]
    return out


def slic(image: np.ndarray, n_segments: int = 100, compactness: float = 10.0, iterations: int = 5,
         connectivity: bool = True) -> np.ndarray:
    """SLIC superpixel labels (int32 H x W, values 0..K-1, K near ``n_segments``) of a uint8 image.

    ``compactness`` weighs space against Lab colour (skimage's convention: m in d = d_lab + (m/S) d_xy).
    """
    if n_segments < 1 or iterations < 1 or compactness <= 0:
        raise ValueError("slic: n_segments and iterations must be >= 1 and compactness > 0")
    lab = _lab(image)
    h, w = lab.shape[:2]
    step = float(np.sqrt(h * w / n_segments))
    ny, nx = max(1, int(round(h / step))), max(1, int(round(w / step)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cell = ((np.arange(h) * ny // h)[:, None].repeat(w, 1), (np.arange(w) * nx // w)[None, :].repeat(h, 0))
    sy, sx = np.meshgrid((np.arange(ny) + 0.5) * h / ny, (np.arange(nx) + 0.5) * w / nx, indexing="ij")
    seeds = lab[sy.astype(int).ravel(), sx.astype(int).ravel()]
    centres = np.concatenate([seeds, sy.reshape(-1, 1), sx.reshape(-1, 1)], axis=1).astype(np.float32)
    spatial_weight = np.float32((compactness / step) ** 2)
    label = np.zeros((h, w), np.int64)
    for _ in range(iterations):
        label = _assign(lab, yy, xx, cell, centres, (ny, nx), spatial_weight)
        centres = _update(lab, yy, xx, label, centres)
    if connectivity:
        label = _enforce_connectivity(label)
    return np.unique(label, return_inverse=True)[1].reshape(h, w).astype(np.int32)


def random_fill(image: np.ndarray, rng: np.random.Generator, n_segments: int = 64,
                max_fraction: float = 0.15, max_regions: int = 3,
                slic_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Superpixel random filling: 1..max_regions superpixels (at most ``max_fraction`` of the image in all)
    painted with random colours (a random grey for grey images). SLIC runs on the image scaled by
    ``slic_scale`` (0.5: 4x cheaper) and the labels are scaled back (nearest).
    Returns (uint8 image, float32 H x W mask)."""
    h, w = image.shape[:2]
    if slic_scale != 1.0:
        small = cv2.resize(image, (max(2, round(w * slic_scale)), max(2, round(h * slic_scale))),
                           interpolation=cv2.INTER_AREA)
        labels = cv2.resize(slic(small, n_segments=n_segments), (w, h), interpolation=cv2.INTER_NEAREST)
    else:
        labels = slic(image, n_segments=n_segments)
    areas = np.bincount(labels.ravel())
    grey = image.ndim == 2 or image.shape[2] == 1 or (np.ptp(image.astype(np.int16), axis=2) == 0).all()
    out = image.copy()
    mask = np.zeros(labels.shape, np.float32)
    budget = max_fraction * labels.size
    for value in rng.permutation(len(areas))[: int(rng.integers(1, max_regions + 1))]:
        if mask.sum() + areas[value] > budget and mask.any():
            continue
        region = labels == value
        channels = 1 if out.ndim == 2 else out.shape[2]
        colour = rng.integers(0, 256, size=1 if grey else channels)
        out[region] = colour if out.ndim == 3 else colour[0]
        mask[region] = 1.0
    return out, mask
