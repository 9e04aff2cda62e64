"""Cross-fitted out-of-sample scores of the training images, for kinds that fit in seconds (PatchCore).

The training images are cut into K seeded folds of whole images; for each fold a model refitted on the other
K - 1 folds scores that fold through the daemon's pipeline (trainer.scoring) with the final model's map
normalisation. Every training image then has a score from a model that never saw it, so the threshold rests
on all the good images instead of only the validation split. A refitted model has seen (K-1)/K of the data,
so it scores new good images slightly higher than the final model would: the threshold errs towards fewer
false rejects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engines.bundle import MapSpec

from .scoring import ModelEngine, Scored, score_images

__all__ = ["fold_indices", "crossfit_scored"]


def fold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """K disjoint, seeded folds of range(n) covering every index (sizes differ by at most one)."""
    if folds < 2 or folds > n:
        raise ValueError(f"cross-fitting needs 2 <= folds <= images, got folds={folds} for {n} images")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, folds)]


def crossfit_scored(refit: Callable[[list[np.ndarray]], object], images: list[np.ndarray], folds: int,
                    channels: int, tile: int, map_spec: MapSpec, batch_size: int = 8,
                    seed: int = 0, config=None) -> Scored:
    """Scores and smoothed maps of every image in ``images``, each from ``refit(other folds)``."""
    parts = fold_indices(len(images), folds, seed)
    scores = np.zeros(len(images), dtype=np.float64)
    maps: list = [None] * len(images)
    for held_out in parts:
        keep = np.setdiff1d(np.arange(len(images)), held_out)
        model = refit([images[i] for i in keep])
        engine = ModelEngine(model, channels, (tile, tile), map_spec, max_batch=batch_size)
        scored = score_images(engine, [images[i] for i in held_out], config)
        config = scored.config
        for j, i in enumerate(held_out):
            scores[i], maps[i] = scored.scores[j], scored.maps[j]
    return Scored(scores, maps, int(map_spec.stride), config)
