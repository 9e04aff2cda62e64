"""benchmarks/zscore_baseline.py: the per-pixel and per-patch z-score baselines of the DFR ablation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from zscore_baseline import fit_zscore, zscore_map, zscore_score  # noqa: E402


def noise(n: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(128, 20, (size, size)).clip(0, 255).astype(np.uint8) for _ in range(n)]


@pytest.mark.parametrize("mode", ["position", "patch"])
def test_a_dark_blob_scores_above_every_good_image(mode):
    model = fit_zscore(noise(20), mode)
    good = [zscore_score(model, im) for im in noise(10, seed=1)]
    bad = noise(1, seed=2)[0].copy()
    bad[20:30, 20:30] = 40
    assert zscore_score(model, bad) > max(good)
    peak = np.unravel_index(np.argmax(zscore_map(model, bad)), bad.shape)
    assert 16 <= peak[0] <= 34 and 16 <= peak[1] <= 34


def test_colour_images_are_averaged_and_sizes_are_checked():
    model = fit_zscore([np.repeat(im[:, :, None], 3, axis=2) for im in noise(5)], "position")
    assert zscore_map(model, noise(1)[0]).shape == (48, 48)
    with pytest.raises(ValueError, match="fitted on"):
        zscore_map(model, noise(1, size=40)[0])
    with pytest.raises(ValueError, match="mode"):
        fit_zscore(noise(2), "pixel")
