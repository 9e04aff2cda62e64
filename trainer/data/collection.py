"""The image collection the shipped EfficientAD teachers are distilled on: sample images that ship inside
PyPI packages (read from the installed packages at run time, never copied into this repository) plus
procedural textures generated from a seed.

``SOURCES`` lists every packaged image with its licence; ``collection_images()`` returns them all as uint8
H x W x 3 arrays (grey images repeated to 3 channels), large images also at half size, followed by
``procedural_textures()``. ELPV cells are deliberately not used: the data set is CC BY-NC-SA 4.0 and the
teachers ship inside an Apache-2.0 package (and ELPV stays an independent benchmark).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["Source", "SOURCES", "CollectionError", "package_image", "collection_images",
           "procedural_textures", "TEXTURE_KINDS"]


@dataclass(frozen=True)
class Source:
    package: str  # import name of the package holding the file
    path: str  # path inside the package
    licence: str
    note: str = ""


SOURCES: tuple[Source, ...] = (
    Source("skimage", "data/astronaut.png", "public domain (NASA)", "portrait, studio"),
    Source("skimage", "data/brick.png", "CC0 (cc0textures.com Bricks25)", "grey brick wall texture"),
    Source("skimage", "data/camera.png", "CC0 (photographer Lav Varshney)", "grey outdoor scene"),
    Source("skimage", "data/cell.png", "CC0", "grey microscopy"),
    Source("skimage", "data/chelsea.png", "CC0 (photographer Stefan van der Walt)", "cat, fur"),
    Source("skimage", "data/clock_motion.png", "public domain (Stefan van der Walt)", "grey, motion blur"),
    Source("skimage", "data/coffee.png", "CC0 (photographer Rachel Michetti)", "cup, saucer, wood"),
    Source("skimage", "data/coins.png", "no known copyright restrictions (Brooklyn Museum)", "grey coins"),
    Source("skimage", "data/grass.png", "CC0 (cc0textures.com)", "grey grass texture"),
    Source("skimage", "data/gravel.png", "CC0 (cc0textures.com Gravel04)", "grey gravel texture"),
    Source("skimage", "data/hubble_deep_field.jpg", "public domain (NASA)", "galaxies on black"),
    Source("skimage", "data/ihc.png", "no known copyright restrictions (CMMI)", "stained tissue"),
    Source("skimage", "data/retina.jpg", "CC0 1.0 (Wikimedia Commons, Haggstrom)", "fundus photograph"),
    Source("skimage", "data/rocket.jpg", "public domain (SpaceX)", "launch, sky, smoke"),
    Source("skimage", "data/text.png", "public domain (Wikipedia Corner.png)", "grey printed text"),
    Source("sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele, Flickr)", "temple, trees"),
    Source("sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion, Flickr)", "flower close-up"),
    Source("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)", "portrait"),
    Source("matplotlib", "mpl-data/sample_data/jacksboro_fault_dem.npz", "public domain (USGS)",
           "elevation model rendered as shaded relief (grey terrain texture)"),
)

TEXTURE_KINDS = ("gratings", "fractal", "brushed", "shapes", "grains")


class CollectionError(RuntimeError):
    """A package of the collection is not installed or lacks a file."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CollectionError(f"package {package!r} is not installed: pip install 'edge-inspect[distill]'")
    return Path(list(spec.submodule_search_locations)[0])


def _relief(path: Path) -> np.ndarray:
    """An elevation model as a shaded-relief grey image (light from the north-west)."""
    z = np.load(path)["elevation"].astype(np.float64)
    gy, gx = np.gradient(z)
    shade = (-gx - gy) / np.sqrt(1.0 + gx ** 2 + gy ** 2)
    shade = (shade - shade.min()) / max(float(np.ptp(shade)), 1e-9)
    return (shade * 255).astype(np.uint8)


def package_image(source: Source) -> np.ndarray:
    """One packaged image as uint8 H x W x 3 (RGB)."""
    path = _package_dir(source.package) / source.path
    if not path.is_file():
        raise CollectionError(f"{source.package} has no {source.path} (another version of the package?)")
    if path.suffix == ".npz":
        image = _relief(path)
    else:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise CollectionError(f"cannot decode {path}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------- procedural textures

def _unit(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / max(float(np.ptp(x)), 1e-9)


def _fractal(size: int, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Gaussian noise with a 1/f^beta amplitude spectrum, scaled to [0, 1]."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** beta
    spectrum = amp * (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape))
    return _unit(np.fft.irfft2(spectrum, s=(size, size)))


def _gratings(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((size, size))
    for _ in range(rng.integers(1, 4)):
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 40)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 6.3))
        out += np.sign(wave) * np.abs(wave) ** rng.uniform(0.2, 1.0)
    return _unit(out + rng.normal(0, rng.uniform(0.02, 0.3), out.shape))


def _brushed(size: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=(size, size)).astype(np.float32)
    length = int(rng.integers(9, 61))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
    streaks = cv2.filter2D(noise, -1, cv2.warpAffine(kernel, rot, (length, length)))
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy
    return _unit(_unit(streaks) + 0.5 * light)


def _shapes(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = np.full((size, size), rng.uniform(0.2, 0.8), np.float32)
    for _ in range(rng.integers(5, 40)):
        value, kind = float(rng.uniform(0, 1)), rng.integers(3)
        p = tuple(int(v) for v in rng.integers(0, size, 2))
        if kind == 0:
            q = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.rectangle(canvas, p, q, value, int(rng.choice([-1, 1, 2, 4])))
        elif kind == 1:
            cv2.circle(canvas, p, int(rng.integers(2, size // 6)), value, int(rng.choice([-1, 1, 3])))
        else:
            q = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(canvas, p, q, value, int(rng.integers(1, 6)))
    blurred = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.3, 2.0)))
    return _unit(blurred + rng.normal(0, 0.03, canvas.shape))


def _grains(size: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells with a random grey level each and dark boundaries (metal grains, ceramics, tiles)."""
    points = rng.uniform(0, size, (int(rng.integers(8, 80)), 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.stack([(yy - py) ** 2 + (xx - px) ** 2 for py, px in points])
    part = np.partition(dist, 1, axis=0)
    label = dist.argmin(axis=0)
    edge = np.sqrt(part[1]) - np.sqrt(part[0]) < rng.uniform(1, 4)
    out = rng.uniform(0.2, 1.0, len(points))[label] * np.where(edge, 0.3, 1.0)
    return _unit(out + 0.1 * _fractal(size, rng, 2.0))


_MAKERS = {"gratings": _gratings, "fractal": lambda s, r: _fractal(s, r, r.uniform(1.0, 2.5)),
           "brushed": _brushed, "shapes": _shapes, "grains": _grains}


def _colourise(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey [0, 1] -> RGB uint8 between two random colours (a third of the textures stay grey)."""
    if rng.uniform() < 1 / 3:
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        low, high = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1, 3)
        rgb = low + grey[:, :, None] * (high - low)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def procedural_textures(count: int = 60, size: int = 384, seed: int = 0) -> list[np.ndarray]:
    """``count`` textures of size x size, the kinds of TEXTURE_KINDS in turn, uint8 H x W x 3."""
    rng = np.random.default_rng(seed)
    return [_colourise(_MAKERS[TEXTURE_KINDS[i % len(TEXTURE_KINDS)]](size, rng), rng) for i in range(count)]


def collection_images(textures: int = 60, half_size_above: int = 400, seed: int = 0) -> list[np.ndarray]:
    """Every packaged image (plus a half-size copy of those with a side > half_size_above) and
    ``textures`` procedural textures."""
    out = []
    for source in SOURCES:
        image = package_image(source)
        out.append(image)
        if min(image.shape[:2]) > half_size_above:
            half = (image.shape[1] // 2, image.shape[0] // 2)
            out.append(cv2.resize(image, half, interpolation=cv2.INTER_AREA))
    return out + procedural_textures(textures, seed=seed)
