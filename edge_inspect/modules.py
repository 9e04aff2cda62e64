"""Solar-module frames built from ELPV cells: a rows x cols grid of 300 x 300 mono8 cells, with the ground
truth per cell. Pure functions; the cells come from the installed ``elpv-dataset`` package at run time
(nothing is copied into the repository: the data set is CC BY-NC-SA).

Ground truth: a cell is defective when its ELPV defect probability is 1.0 (group "defect" of
``trainer.data.elpv``); cells rated 1/3 or 2/3 are left out of the demo (uncertain labels). A module is
defective when any of its cells is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ModuleLayout", "Module", "compose", "cell_boxes", "joint_zones", "draw_modules", "good_modules",
           "as_mono"]


@dataclass(frozen=True)
class ModuleLayout:
    rows: int = 3
    cols: int = 4
    cell: int = 300  # pixels; ELPV cells are 300 x 300

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1 or self.cell < 8:
            raise ValueError(f"module layout needs rows, cols >= 1 and cell >= 8, got {self}")

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows * self.cell, self.cols * self.cell


@dataclass(frozen=True)
class Module:
    image: np.ndarray  # H x W uint8
    defects: np.ndarray  # rows x cols bool: the cell is defective
    names: tuple[str, ...]  # cell file names, row-major

    @property
    def defective(self) -> bool:
        return bool(self.defects.any())


def as_mono(cell: np.ndarray) -> np.ndarray:
    """H x W or H x W x 1 uint8 -> H x W uint8."""
    cell = np.asarray(cell)
    if cell.ndim == 3 and cell.shape[2] == 1:
        cell = cell[:, :, 0]
    if cell.ndim != 2 or cell.dtype != np.uint8:
        raise ValueError(f"a cell must be a mono uint8 image, got {cell.dtype} {cell.shape}")
    return cell


def compose(cells: list[np.ndarray], layout: ModuleLayout) -> np.ndarray:
    """Tile ``layout.cells`` mono cells row-major into one frame (each resized to layout.cell if needed)."""
    import cv2

    if len(cells) != layout.cells:
        raise ValueError(f"a {layout.rows}x{layout.cols} module needs {layout.cells} cells, got {len(cells)}")
    out = np.empty(layout.shape, dtype=np.uint8)
    for (x, y, w, h), cell in zip(cell_boxes(layout), cells, strict=True):
        cell = as_mono(cell)
        if cell.shape != (h, w):
            cell = cv2.resize(cell, (w, h), interpolation=cv2.INTER_AREA)
        out[y:y + h, x:x + w] = cell
    return out


def cell_boxes(layout: ModuleLayout) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of every cell, row-major."""
    c = layout.cell
    return [(col * c, row * c, c, c) for row in range(layout.rows) for col in range(layout.cols)]


def joint_zones(layout: ModuleLayout, margin: int) -> list[tuple[int, int, int, int]]:
    """Ignore zones (x, y, w, h) covering ``margin`` pixels on each side of every cell edge: the joints
    between cells and the module border, where good cells differ most (chamfered corners, dark edges)."""
    if margin <= 0:
        return []
    height, width = layout.shape
    zones = []
    for r in range(layout.rows + 1):
        y0, y1 = max(0, r * layout.cell - margin), min(height, r * layout.cell + margin)
        zones.append((0, y0, width, y1 - y0))
    for c in range(layout.cols + 1):
        x0, x1 = max(0, c * layout.cell - margin), min(width, c * layout.cell + margin)
        zones.append((x0, 0, x1 - x0, height))
    return zones


def good_modules(cells: list[np.ndarray], layout: ModuleLayout, count: int, seed: int) -> list[np.ndarray]:
    """``count`` modules of good cells: seeded permutations, every cell used before any is reused."""
    if not cells:
        raise ValueError("no good cells to build modules from")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < count * layout.cells:
        order.extend(rng.permutation(len(cells)).tolist())
    return [compose([cells[i] for i in order[k * layout.cells:(k + 1) * layout.cells]], layout)
            for k in range(count)]


def draw_modules(good: list[np.ndarray], good_names: list[str], defect: list[np.ndarray],
                 defect_names: list[str], layout: ModuleLayout, count: int, defect_share: float,
                 max_defects: int, seed: int) -> list[Module]:
    """``count`` modules; a share ``defect_share`` of them (seeded) holds 1..max_defects defective cells
    at random places, the rest only good cells. Cells are reused only when a kind runs out."""
    if not 0.0 <= defect_share <= 1.0:
        raise ValueError(f"defect_share must be in [0, 1], got {defect_share}")
    if len(good) < layout.cells:
        raise ValueError(f"need at least {layout.cells} good cells, got {len(good)}")
    if defect_share > 0 and not defect:
        raise ValueError("defect_share > 0 but there are no defective cells")
    rng = np.random.default_rng(seed)
    pools = {"good": _Cycle(len(good), rng), "defect": _Cycle(len(defect), rng)}
    n_bad = int(round(count * defect_share))
    bad = set(rng.choice(count, size=n_bad, replace=False).tolist()) if n_bad else set()
    out = []
    for k in range(count):
        defects = np.zeros((layout.rows, layout.cols), dtype=bool)
        if k in bad:
            n = int(rng.integers(1, max(1, max_defects) + 1))
            defects.flat[rng.choice(layout.cells, size=min(n, layout.cells), replace=False)] = True
        cells, names = [], []
        for is_bad in defects.flat:
            i = pools["defect" if is_bad else "good"].next()
            cells.append(defect[i] if is_bad else good[i])
            names.append(defect_names[i] if is_bad else good_names[i])
        out.append(Module(compose(cells, layout), defects, tuple(names)))
    return out


class _Cycle:
    """Indices 0..n-1 in seeded random order, reshuffled when used up."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.order = n, rng, []

    def next(self) -> int:
        if not self.order:
            self.order = self.rng.permutation(self.n).tolist()
        return self.order.pop()
