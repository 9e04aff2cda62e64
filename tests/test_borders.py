"""No blind borders: a small defect planted in the outer 8 px of a tile must change that tile's map (every
kind, every size, tiles 64 and 128) and, after a short training, score above every good image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.calibrate import map_spec_from_raw
from trainer.evaluate import model_scored, raw_maps
from trainer.fit import TrainConfig, fit
from trainer.models import MODEL_KINDS, MODEL_SIZES, create_model

TILES = (64, 128)
# where the defect goes: (top, left) of a 6 x 6 patch, all inside the outer 8 px band of the tile
PLACES = {"top-left corner": lambda t: (1, 1), "left edge": lambda t: (t // 2 - 3, 1),
          "bottom edge": lambda t: (t - 7, t // 2 - 3), "bottom-right corner": lambda t: (t - 7, t - 7)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 spinning OpenMP threads are far slower on the shared cores
    yield
    torch.set_num_threads(before)


def texture(seed: int, size: int) -> np.ndarray:
    """Good part: a woven texture with a random phase and a little noise (uint8 H x W x 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = 128 + 50 * np.sin(xx / 3.0 + phase[0]) * np.sin(yy / 3.0 + phase[1])
    img = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def plant(image: np.ndarray, top: int, left: int) -> np.ndarray:
    out = image.copy()
    out[top:top + 6, left:left + 6] = (255, 40, 40)  # a small saturated spot
    return out


def build(kind: str, size: str, tile: int, **options):
    torch.manual_seed(0)
    extra = {"tile": tile} if kind == "efficientad" else {"latent": 8} if kind == "dfr" else {}
    if kind == "patchcore":
        extra = {"min_bank": 64}
    model = create_model(kind, size, **{**extra, **options}).eval()
    if kind == "patchcore":  # the bank is the model: good tiles of the same texture
        model.fit_bank([_to_input(texture(500 + i, tile), model) for i in range(2)])
    return model


def _to_input(image: np.ndarray, model) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(model.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.input_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def border_response(model, tile: int, place: str) -> float:
    """Largest change of any raw map near the planted patch, relative to the map's own scale."""
    good = texture(0, tile)
    top, left = PLACES[place](tile)
    before = model(_to_input(good, model))
    after = model(_to_input(plant(good, top, left), model))
    s = model.map_stride
    window = (slice(None), slice(None), slice(max(0, top // s - 1), (top + 6) // s + 2),
              slice(max(0, left // s - 1), (left + 6) // s + 2))
    return float((after - before).abs()[window].max() / (before.abs().max() + 1e-12))


CASES = [(k, s, t) for k in MODEL_KINDS for s in MODEL_SIZES[k] for t in TILES if not (s == "m" and t == 128)]


@pytest.mark.parametrize(("kind", "size", "tile"), CASES)
@pytest.mark.parametrize("place", sorted(PLACES))
def test_a_defect_in_the_outer_8_px_changes_the_map(kind, size, tile, place):
    model = build(kind, size, tile)
    assert border_response(model, tile, place) > 1e-3


@pytest.mark.parametrize("tile", TILES)
def test_the_official_unpadded_efficientad_is_blind_there(tile):
    """What border="reflect" fixes: without it the maps are zero-padded by 4, a 16 px band sees nothing."""
    model = build("efficientad", "s", tile, border="none")
    assert border_response(model, tile, "top-left corner") == 0.0
    assert build("efficientad", "s", tile).feature_hw == (tile // 4, tile // 4)


# ---------------------------------------------------------------- after training

TRAIN_STEPS = {"efficientad": 150, "dfr": 60, "reconstruction": 150, "mkd": 60, "tsdn": 60, "saliency": 0,
               "patchcore": 0}


def _trained(kind: str, tile: int):
    from trainer.teacher import load_shipped_teacher

    model = build(kind, "s", tile).train()
    if kind == "efficientad":
        load_shipped_teacher(model)
    steps = TRAIN_STEPS.get(kind, 60)
    fit(model, [texture(100 + i, tile + 16) for i in range(8)],
        TrainConfig(steps=steps, tile=tile, lr=1e-3 if kind != "efficientad" else 1e-4, pca_samples=4))
    return model.eval()


@pytest.mark.slow  # a short training per kind and tile: ~5-40 s each on the shared 2-core CPU
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_border_defect_scores_above_every_good_tile(kind, tile):
    model = _trained(kind, tile)
    val = [texture(200 + i, tile) for i in range(6)]
    spec = map_spec_from_raw(raw_maps(model, val), model.map_weights, tile, stride=model.map_stride)
    good = [texture(300 + i, tile) for i in range(12)]
    good_scores = model_scored(model, good, 3, tile, spec).scores  # the daemon's score
    defects = [plant(texture(400, tile), *where(tile)) for where in PLACES.values()]
    for place, score in zip(PLACES, model_scored(model, defects, 3, tile, spec).scores, strict=True):
        assert score > max(good_scores), (place, score, max(good_scores))
