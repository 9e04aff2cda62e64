"""A real-texture MVTec-layout data set, cut at run time from the texture photos inside scikit-image.

The scikit-image wheel ships three 512 x 512 grey texture photos, each under the Creative Commons CC0 licence
(see ``TEXTURES``; no download happens: the files are part of the installed package). For each category
``write_texture_tree(root, "grass")`` writes

  root/grass/train/good/000.png ...        crops from the top of the photo (the training region)
  root/grass/validation/good/000.png ...   crops from a column band beside the training region
  root/grass/test/good/000.png ...         crops from the bottom of the photo (the test region)
  root/grass/test/{scratch,stain,swap}/... test-region crops with one painted defect each
  root/grass/ground_truth/<type>/000_mask.png
  root/grass/manifest.json                 source, licence, regions and every crop's origin and defect

The regions are separated by ``gap`` pixels, so no test or validation crop shares a pixel with a training
crop. Training crops overlap one another (120 crops of 128 x 128 from a ~376 x 350 region), so a random
validation split of train/good would score crops of training images and set thresholds in sample: the
validation crops come from their own band (the right-most ``size`` columns of the top rows; ``validation/``
is our extension of the MVTec layout, which has none, and ``load_mvtec`` uses it when present), and
``manifest.json`` says ``train_crops_overlap`` so the trainer does not cross-fit over them. It records each
crop's origin.

Defect types:
  scratch  a thin (1-2 px) bright or dark polyline, 30-90 px long;
  stain    a smooth, low-contrast darkening or brightening with soft (Gaussian) edges, sigma 7-14 px;
           the mask is where the change exceeds half its peak;
  swap     a 20-40 px patch replaced by another texture (mean/std matched to the crop, so only the texture
           differs) or by a 90-degree-rotated patch of the same photo taken elsewhere in the test region.

``python -m trainer.data.textures --out DIR`` writes every category.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .images import DataError

__all__ = ["TEXTURES", "DEFECT_TYPES", "Texture", "load_texture", "texture_regions", "validation_columns",
           "paint_scratch", "paint_stain", "paint_swap", "write_texture_tree", "main"]

DEFECT_TYPES = ("scratch", "stain", "swap")


@dataclass(frozen=True)
class Texture:
    """One photo of the scikit-image wheel (skimage/data/<file>) and where it comes from."""

    file: str
    source: str
    licence: str


TEXTURES: dict[str, Texture] = {
    "brick": Texture("brick.png", "CC0Textures 'Bricks25' (perspective-corrected, rotated, cropped by "
                                  "scikit-image)", "CC0 1.0"),
    "grass": Texture("grass.png", "DeviantArt 'Grass-01' by linolafett (cropped, grey by scikit-image)",
                     "CC0 1.0"),
    "gravel": Texture("gravel.png", "CC0Textures 'Gravel04' (rescaled, cropped, grey by scikit-image)",
                      "CC0 1.0"),
}


def load_texture(name: str) -> np.ndarray:
    """The texture photo ``name`` as a uint8 H x W array, read from the installed scikit-image package."""
    if name not in TEXTURES:
        raise DataError(f"unknown texture {name!r}: valid are {sorted(TEXTURES)}")
    try:
        from importlib.resources import files

        path = files("skimage") / "data" / TEXTURES[name].file
    except ModuleNotFoundError as exc:
        raise DataError("the texture data set needs scikit-image (pip install -e '.[dev]')") from exc
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"cannot read {path}: is scikit-image installed completely?", Path(str(path)))
    return image


def texture_regions(height: int, size: int, test_fraction: float, gap: int) -> tuple[range, range]:
    """Rows of the training region (top) and of the test region (bottom) of a photo ``height`` rows tall."""
    test_rows = max(size, int(round(height * test_fraction)))
    train_end = height - test_rows - gap
    if train_end < size:
        raise DataError(f"a {height}-row photo cannot hold a training region of {size} rows, a gap of {gap} "
                        f"and a test region of {test_rows} rows: lower size or test_fraction")
    return range(0, train_end), range(height - test_rows, height)


def validation_columns(width: int, size: int, gap: int) -> tuple[range, range]:
    """Columns of the training region and of the validation band (the right-most ``size`` columns)."""
    train_end = width - size - gap
    if train_end < size:
        raise DataError(f"a {width}-column photo cannot hold a training region of {size} columns, a gap of "
                        f"{gap} and a validation band of {size} columns: lower size")
    return range(0, train_end), range(width - size, width)


def _crop_origin(rows: range, cols: range, size: int, rng: np.random.Generator) -> tuple[int, int]:
    top = int(rng.integers(rows.start, rows.stop - size + 1))
    return top, int(rng.integers(cols.start, cols.stop - size + 1))


def paint_scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A thin bright or dark polyline (3 segments, 30-90 px in all); returns (image, mask, parameters)."""
    size = image.shape[0]
    length = rng.uniform(30, 90)
    angle = rng.uniform(0, np.pi)
    start = rng.uniform(size * 0.2, size * 0.8, size=2)
    points = [start]
    for _ in range(3):
        angle += rng.uniform(-0.35, 0.35)
        points.append(points[-1] + length / 3 * np.array([np.cos(angle), np.sin(angle)]))
    pts = np.clip(np.round(np.array(points)), 0, size - 1).astype(np.int32).reshape(-1, 1, 2)
    width = int(rng.integers(1, 3))
    line = np.zeros(image.shape, np.uint8)
    cv2.polylines(line, [pts], False, 255, width, cv2.LINE_AA)
    alpha = line.astype(np.float32) / 255.0
    bright = bool(rng.integers(0, 2))
    value = (np.percentile(image, 99) + 25) if bright else (np.percentile(image, 1) - 25)
    out = image.astype(np.float32) * (1 - alpha) + float(np.clip(value, 0, 255)) * alpha
    mask = cv2.dilate((alpha > 0.25).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return _u8(out), mask, {"points": pts.reshape(-1, 2).tolist(), "width": width, "bright": bright}


def paint_stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A smooth elliptical change of intensity (soft Gaussian edges, low contrast); returns
    (image, mask, parameters). Multiplicative, so the texture stays visible through the stain."""
    size = image.shape[0]
    cy, cx = rng.uniform(size * 0.25, size * 0.75, size=2)
    sy, sx = rng.uniform(7, 14, size=2)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / sx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / sy
    blob = np.exp(-0.5 * (u ** 2 + v ** 2))
    gain = float(rng.uniform(0.22, 0.35)) * (1 if rng.integers(0, 2) else -1)
    out = image.astype(np.float32) * (1 + gain * blob)
    mask = blob > 0.5
    return _u8(out), mask, {"centre": [float(cy), float(cx)], "sigma": [float(sy), float(sx)],
                            "angle": float(theta), "gain": gain}


def paint_swap(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, foreign: bool
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Replace a 20-40 px patch with a patch of ``donor`` (H x W uint8, larger than the patch). ``foreign``:
    the donor is another texture and its patch gets the crop's mean and std; otherwise the patch (from the
    same photo, elsewhere) is rotated by 90 degrees. Returns (image, mask, parameters)."""
    size = image.shape[0]
    ph, pw = (int(v) for v in rng.integers(20, 41, size=2))
    margin = size // 8
    top = int(rng.integers(margin, size - ph - margin + 1))
    left = int(rng.integers(margin, size - pw - margin + 1))
    sh, sw = (pw, ph) if not foreign else (ph, pw)
    dt, dl = int(rng.integers(0, donor.shape[0] - sh + 1)), int(rng.integers(0, donor.shape[1] - sw + 1))
    patch = donor[dt:dt + sh, dl:dl + sw].astype(np.float32)
    if foreign:
        region = image.astype(np.float32)
        patch = (patch - patch.mean()) / max(float(patch.std()), 1.0) * region.std() + region.mean()
    else:
        patch = np.rot90(patch)
    out = image.astype(np.float32)
    out[top:top + ph, left:left + pw] = patch
    mask = np.zeros(image.shape, bool)
    mask[top:top + ph, left:left + pw] = True
    return _u8(out), mask, {"box": [top, left, ph, pw], "donor_origin": [dt, dl], "foreign": foreign}


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray, channels: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image if channels == 1 else np.repeat(image[:, :, None], 3, axis=2)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")


def _defect(kind: str, crop: np.ndarray, photo: np.ndarray, test_rows: range, donors: list[np.ndarray],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    if kind == "scratch":
        return paint_scratch(crop, rng)
    if kind == "stain":
        return paint_stain(crop, rng)
    foreign = bool(donors) and bool(rng.integers(0, 2))
    donor = donors[int(rng.integers(0, len(donors)))] if foreign else photo[test_rows.start:test_rows.stop]
    return paint_swap(crop, donor, rng, foreign)


def write_texture_tree(root: str | Path, category: str, size: int = 128, n_train: int = 120,
                       n_test_good: int = 30, n_test_defect: int = 20, test_fraction: float = 0.3,
                       gap: int = 8, channels: int = 1, seed: int = 0, n_val: int = 30) -> Path:
    """Write one texture category in MVTec-AD layout under root (see the module docstring); returns the
    category folder. Deterministic for a given seed and scikit-image version."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if size < 32 or min(n_train, n_test_good, n_test_defect, n_val) < 1:
        raise DataError("size must be >= 32 and every image count >= 1")
    photo = load_texture(category)
    train_rows, test_rows = texture_regions(photo.shape[0], size, test_fraction, gap)
    train_cols, val_cols = validation_columns(photo.shape[1], size, gap)
    all_cols = range(0, photo.shape[1])
    donors = [load_texture(name) for name in sorted(TEXTURES) if name != category]
    rng = np.random.default_rng([seed, sorted(TEXTURES).index(category)])
    cat = Path(root) / category
    manifest = {"category": category, "photo": f"skimage/data/{TEXTURES[category].file}",
                "source": TEXTURES[category].source, "licence": TEXTURES[category].licence, "size": size,
                "seed": seed, "train_rows": [train_rows.start, train_rows.stop],
                "test_rows": [test_rows.start, test_rows.stop],
                "train_cols": [train_cols.start, train_cols.stop],
                "validation_cols": [val_cols.start, val_cols.stop], "train_crops_overlap": True, "files": {}}

    def crop(rows: range, cols: range = all_cols) -> tuple[np.ndarray, list[int]]:
        top, left = _crop_origin(rows, cols, size, rng)
        return photo[top:top + size, left:left + size], [top, left]

    for split, rows, cols, n in (("train", train_rows, train_cols, n_train),
                                 ("validation", train_rows, val_cols, n_val),
                                 ("test", test_rows, all_cols, n_test_good)):
        for i in range(n):
            image, origin = crop(rows, cols)
            _write(cat / split / "good" / f"{i:03d}.png", image, channels)
            manifest["files"][f"{split}/good/{i:03d}.png"] = {"origin": origin}
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            image, origin = crop(test_rows)
            image, mask, params = _defect(kind, image, photo, test_rows, donors, rng)
            _write(cat / "test" / kind / f"{i:03d}.png", image, channels)
            _write(cat / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255, 1)
            manifest["files"][f"test/{kind}/{i:03d}.png"] = {"origin": origin, **params}
    (cat / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return cat


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data.textures",
                                description="Write the real-texture MVTec-layout data set (scikit-image "
                                            "photos, CC0) under --out.")
    p.add_argument("--out", required=True, help="root folder to write (one sub-folder per category)")
    p.add_argument("--categories", nargs="+", default=sorted(TEXTURES), choices=sorted(TEXTURES))
    p.add_argument("--size", type=int, default=128, help="crop size in pixels (128)")
    p.add_argument("--n-train", type=int, default=120, help="good training crops per category (120)")
    p.add_argument("--n-val", type=int, default=30, help="good validation crops per category (30)")
    p.add_argument("--n-test-good", type=int, default=30, help="good test crops per category (30)")
    p.add_argument("--n-test-defect", type=int, default=20, help="test crops per defect type (20)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 grey or 3 repeated (1)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    args = p.parse_args(argv)
    try:
        for category in args.categories:
            cat = write_texture_tree(args.out, category, args.size, args.n_train, args.n_test_good,
                                     args.n_test_defect, channels=args.channels, seed=args.seed,
                                     n_val=args.n_val)
            print(f"wrote {cat}")
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
