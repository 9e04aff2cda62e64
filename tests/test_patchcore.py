"""PatchCore: greedy coreset, memory bank, maps that find a planted defect (also at the tile border),
checkpoint round trip, edge-train with cross-fitted calibration, export parity through every engine here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engines.bundle import read_bundle
from engines.registry import available_backends, open_engine
from trainer.fit import TrainConfig, fit, read_checkpoint, restore_model
from trainer.models import create_model
from trainer.models.patchcore import greedy_coreset

TILE = 64


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texture(seed: int, size: int = TILE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 50 * np.sin(xx / 2.5 + seed) * np.sin(yy / 2.5 + 2 * seed)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)[:, :, None]


def _scores(model, images) -> np.ndarray:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255.0
    x = (x - torch.tensor(model.input_mean).view(1, 3, 1, 1)) / torch.tensor(model.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).amax(dim=(1, 2, 3)).numpy()


def test_greedy_coreset_is_a_k_center_cover():
    """Greedy k-center: one centre per well-separated cluster, and the cover radius within twice the optimum
    (bounded above by the best single centre of each cluster, found by brute force)."""
    gen = torch.Generator().manual_seed(0)
    groups = [torch.randn(200, 4, generator=gen) * 0.1 + c for c in (0.0, 5.0, -5.0)]
    points = torch.cat(groups)
    chosen = greedy_coreset(points, 3, projection_dim=0)
    assert len(set(chosen.tolist())) == 3
    clusters = {int(torch.round(points[i, 0] / 5).item()) for i in chosen}
    assert clusters == {-1, 0, 1}  # one centre per cluster
    radius = torch.cdist(points, points[chosen]).min(dim=1).values.max()
    best = max(torch.cdist(g, g).max(dim=1).values.min() for g in groups)  # OPT <= best
    assert radius <= 2 * best
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(points, 0)


def test_feature_cache_gives_the_same_bank_and_skips_the_backbone(monkeypatch):
    """Cross-fitted refits share a feature cache: the bank is identical, and cached tiles never reach the
    backbone again."""
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, TILE, TILE) for _ in range(3)]
    plain = create_model("patchcore", min_bank=50, pretrained=False)
    plain.fit_bank(iter(batches))
    cached = create_model("patchcore", min_bank=50, pretrained=False)
    cached.backbone.load_state_dict(plain.backbone.state_dict())
    cached.feature_cache = {}
    cached.fit_bank(iter(batches))
    assert torch.equal(cached.bank, plain.bank) and len(cached.feature_cache) == 6
    seen = []
    original = cached.patch_features
    monkeypatch.setattr(cached, "patch_features", lambda x: seen.append(len(x)) or original(x))
    cached.fit_bank(iter([batches[1], torch.cat([batches[0][:1], torch.randn(1, 3, TILE, TILE)])]))
    assert seen == [1]  # only the new tile was computed
    assert len(cached.feature_cache) == 7


def test_options_are_validated():
    with pytest.raises(ValueError, match="taps"):
        create_model("patchcore", taps=(3,))
    with pytest.raises(ValueError, match="pad must be a multiple"):
        create_model("patchcore", pad=12)
    with pytest.raises(ValueError, match="bank_fraction"):
        create_model("patchcore", bank_fraction=0.0)
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        create_model("patchcore")(torch.zeros(1, 3, TILE, TILE))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("pc") / "ckpt.pt"
    model = create_model("patchcore", "s", min_bank=256)
    history = fit(model, [_texture(i) for i in range(8)],
                  TrainConfig(tile=TILE, batch_size=4, checkpoint_path=str(ckpt)))
    return model.eval(), history, ckpt


def test_bank_fit_and_checkpoint_round_trip(fitted):
    model, history, ckpt = fitted
    assert history["steps"] == 0 and history["loss"] == []
    assert history["bank"] == 256 and history["patches"] == 8 * (TILE // 8) ** 2 and history["tiles"] == 8
    assert model.bank.shape == (256, 40 + 112) and torch.isfinite(model.bank).all()
    again = restore_model(create_model("patchcore", "s", min_bank=256), read_checkpoint(ckpt)).eval()
    x = torch.randn(2, 3, TILE, TILE)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("where", ["centre", "border"])
def test_planted_defect_scores_above_every_good_image(fitted, where):
    """A small bright spot, in the middle or within the outer 8 px of the tile (no blind borders), scores
    above every good image of the same texture."""
    model, _, _ = fitted
    good = _scores(model, [_texture(100 + i) for i in range(12)])
    spot = [_texture(200 + i).copy() for i in range(4)]
    for i, img in enumerate(spot):
        y, x = (30, 30) if where == "centre" else [(1, 20), (58, 40), (25, 0), (40, 58)][i]
        img[y:y + 6, x:x + 6] = 255
    bad = _scores(model, spot)
    assert bad.min() > good.max(), (bad, good.max())


def test_edge_train_patchcore_cross_fits_and_exports(tmp_path):
    """edge-train --kind patchcore: a bundle whose threshold rests on every good image (validation split +
    5-fold cross-fitted training images), and the same maps from every engine available here."""
    from trainer.cli import main

    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(14):
        cv2.imwrite(str(folder / f"{i:02d}.png"), _texture(300 + i, size=80))
    out = tmp_path / "bundle"
    assert main(["train", "--folder", str(folder), "--kind", "patchcore", "--tile", str(TILE),
                 "--option", "min_bank=128", "--val-fraction", "0.3", "--out", str(out)]) == 0
    meta = read_bundle(out)
    cal = meta.calibration
    assert meta.kind == "patchcore" and cal["n_good"] == 14 and "5-fold" in cal["source"]
    assert cal["image_threshold"]["estimator"] == "exponential-tail"  # 14 images cannot resolve 1 %
    assert meta.pixel_threshold <= meta.image_threshold
    tiles = np.stack([_texture(400 + i) for i in range(3)])
    tiles[1, 20:28, 20:28] = 255
    results = {}
    for backend in ("onnxruntime", "torch", "openvino"):
        if backend not in available_backends():
            continue
        engine = open_engine(out, backend=backend, max_batch=4, streams=1, threads=1)
        try:
            results[backend] = np.asarray(engine.infer(tiles))
        finally:
            engine.close()
    assert {"onnxruntime", "torch"} <= set(results)
    ref = results["onnxruntime"]
    assert ref.shape == (3, 1, TILE // 4, TILE // 4) and np.isfinite(ref).all()
    assert ref[1].max() > ref[0].max() and ref[1].max() > ref[2].max()
    for backend, got in results.items():
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()), err_msg=backend)
