"""Image folders as uint8 H x W x C arrays (C = 1 mono, 3 RGB), masks, and crop/resize helpers.

Every problem with user data raises ``DataError`` (a ValueError) naming the offending path, so the CLI can
print one clear line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "DataError", "list_images", "read_image", "read_images", "read_mask",
           "to_channels", "resize", "center_crop", "random_crop", "check_tile"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """User data is missing or malformed; ``path`` names the file or folder at fault."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; DataError if the folder is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist", folder)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}", folder)
    return paths


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read one image as uint8 H x W x C (RGB order); ``channels`` (1 or 3) must match if given."""
    path = Path(path)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"cannot read image {path} (missing, corrupt or unsupported format)", path)
    if raw.dtype == np.uint16:
        raw = (raw >> 8).astype(np.uint8)
    elif raw.dtype != np.uint8:
        raise DataError(f"image {path} has pixel type {raw.dtype}; expected 8 or 16 bit", path)
    if raw.ndim == 2:
        image = raw[:, :, None]
    elif raw.shape[2] in (3, 4):
        image = cv2.cvtColor(raw[:, :, :3], cv2.COLOR_BGR2RGB)
    else:
        image = raw[:, :, :1]
    if channels is not None and image.shape[2] != channels:
        raise DataError(f"image {path} has {image.shape[2]} channel(s), expected {channels}", path)
    return np.ascontiguousarray(image)


def read_images(folder: str | Path, channels: int | None = None, limit: int | None = None,
                seed: int = 0) -> tuple[list[np.ndarray], list[Path]]:
    """Every image of a folder (sorted); with ``limit``, a seeded random subset kept in sorted order.

    The channel count is that of the first image unless given; every image must match it.
    """
    paths = list_images(folder)
    if limit is not None and limit < len(paths):
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
        paths = [paths[i] for i in keep]
    images: list[np.ndarray] = []
    for path in paths:
        image = read_image(path, channels)
        channels = image.shape[2]
        images.append(image)
    return images, paths


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as bool H x W; its size must equal ``shape`` (the image's H, W)."""
    mask = read_image(path)[:, :, 0] > 0
    if mask.shape != tuple(shape):
        raise DataError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is "
                        f"{shape[1]}x{shape[0]}", path)
    return mask


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert an H x W x C uint8 image to 1 (luma) or 3 (replicated) channels."""
    have = image.shape[2]
    if have == channels:
        return image
    if channels == 1 and have == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    if channels == 3 and have == 1:
        return np.repeat(image, 3, axis=2)
    raise DataError(f"cannot convert a {have}-channel image to {channels} channels")


def resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """Resize H x W x C (or a H x W mask) keeping the layout; area filter down, linear up."""
    if image.shape[:2] == (height, width):
        return image
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if height < image.shape[0] else cv2.INTER_LINEAR
    src = image.astype(np.uint8) if image.dtype == bool else image
    out = cv2.resize(src, (width, height), interpolation=interp)
    if image.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out.astype(bool) if image.dtype == bool else out


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if height > h or width > w:
        raise DataError(f"crop {width}x{height} is larger than the image ({w}x{h})")
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def random_crop(image: np.ndarray, tile: int, rng: np.random.Generator) -> np.ndarray:
    """A tile x tile crop at a uniformly random position."""
    h, w = image.shape[:2]
    if tile > h or tile > w:
        raise DataError(f"tile {tile} is larger than the image ({w}x{h})")
    top = int(rng.integers(0, h - tile + 1))
    left = int(rng.integers(0, w - tile + 1))
    return image[top:top + tile, left:left + tile]


def check_tile(images: list[np.ndarray], tile: int, paths: list[Path] | None = None) -> None:
    """DataError if any image is smaller than tile x tile."""
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        if tile > h or tile > w:
            where = paths[i] if paths else None
            name = f" {where}" if where else f" #{i}"
            raise DataError(f"tile {tile} is larger than image{name} ({w}x{h}); use a smaller --tile "
                            f"or --resize", where)
