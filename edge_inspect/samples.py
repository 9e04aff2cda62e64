"""`edge-inspect samples`: write sample images to try the tools on, in the layouts the tools read.

    <out>/good/                  good images: `edge-train train --folder <out>/good`
    <out>/test/good/             held-out good images      } `edge-train evaluate --folder <out>/test`,
    <out>/test/<defect type>/    defective images          } `edge-inspect predict ... <out>/test/<type>`
    <out>/test/ground_truth/<defect type>/<name>_mask.png    (synthetic source only: ELPV has no masks)

Sources: ``elpv`` (default): 300 x 300 mono solar cells of the installed ``elpv-dataset`` package (seeded
split of trainer.data.elpv: training and validation good cells -> good/, held-out good cells and cells of
defect probability 1.0 -> test/); ``synthetic``: woven textures with painted scratches and spots
(trainer.data.synthetic), with masks. The folder lies outside the repository's control (``data/`` is
git-ignored): the ELPV images are CC BY-NC-SA and are never committed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SampleCounts", "write_samples", "MARKER"]

MARKER = "SAMPLES.txt"


@dataclass(frozen=True)
class SampleCounts:
    good: int = 60  # training images
    test_good: int = 20
    test_defect: int = 20  # per defect type


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _elpv(out: Path, counts: SampleCounts, cell_type: str, seed: int) -> dict[str, int]:
    from trainer.data.elpv import load_elpv

    splits = load_elpv(cell_type, seed=seed)
    good = (splits.train + splits.val)[:counts.good]
    test = splits.test
    groups = np.array(test.groups)
    written = {"good": 0, "test/good": 0, "test/defect": 0}
    for i, image in enumerate(good):
        _write_png(out / "good" / f"{i:04d}.png", image)
    written["good"] = len(good)
    for group, folder, limit in (("good", "test/good", counts.test_good),
                                 ("defect", "test/defect", counts.test_defect)):
        picks = np.flatnonzero(groups == group)[:limit]
        for i in picks:
            _write_png(out / folder / test.names[i], test.images[i])
        written[folder] = len(picks)
    return written


def _synthetic(out: Path, counts: SampleCounts, seed: int, size: int = 320) -> dict[str, int]:
    from trainer.data.synthetic import DEFECT_TYPES, write_mvtec_tree

    with tempfile.TemporaryDirectory(prefix="edge-inspect-samples-") as tmp:
        cat = write_mvtec_tree(tmp, "samples", size=size, n_train=counts.good, n_test_good=counts.test_good,
                               n_test_defect=counts.test_defect, channels=1, seed=seed)
        shutil.copytree(cat / "train" / "good", out / "good", dirs_exist_ok=True)
        shutil.copytree(cat / "test", out / "test", dirs_exist_ok=True)
        shutil.copytree(cat / "ground_truth", out / "test" / "ground_truth", dirs_exist_ok=True)
    return {"good": counts.good, "test/good": counts.test_good,
            **{f"test/{kind}": counts.test_defect for kind in DEFECT_TYPES}}


def _prepare(out: Path) -> None:
    """An absent or empty folder, or one this command wrote before (its good/ and test/ are replaced);
    ValueError for anything else: nothing of the user's is overwritten or mixed in."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"{out} is not empty and was not written by `edge-inspect samples`; choose a "
                             f"new --out folder")
        for name in ("good", "test"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_samples(out: str | Path, source: str = "elpv", counts: SampleCounts = SampleCounts(),
                  cell_type: str = "mono", seed: int = 0) -> dict[str, int]:
    """Write the sample folders under ``out`` (see the module docstring); returns images per folder."""
    out = Path(out)
    if source not in ("elpv", "synthetic"):
        raise ValueError(f"source must be elpv or synthetic, got {source!r}")
    _prepare(out)
    written = _elpv(out, counts, cell_type, seed) if source == "elpv" else _synthetic(out, counts, seed)
    licence = ("ELPV cells (elpv-dataset, CC BY-NC-SA 4.0): do not commit or redistribute"
               if source == "elpv" else "synthetic images (trainer.data.synthetic)")
    (out / MARKER).write_text(f"written by `edge-inspect samples --source {source}`: {licence}\n"
                              + "".join(f"{k}: {v} images\n" for k, v in written.items()))
    return written
