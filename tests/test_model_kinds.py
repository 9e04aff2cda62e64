"""The seeds' other methods as model kinds: reconstruction AE, MKD, TSDN, zero-shot saliency; SLIC and
superpixel random filling; edge-train -> bundle -> ONNX parity; one kind end to end through the daemon."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.bundle import read_bundle
from engines.graph import ONNX_INPUT, DeployModel
from trainer.data.superpixels import random_fill, slic
from trainer.fit import TrainConfig, fit, read_checkpoint, restore_model
from trainer.models import MODEL_KINDS, create_model
from trainer.models.saliency import (
    FoundationModelsUnavailable,
    Region,
    RegionPrompter,
    UnconfiguredPrompter,
    rescore_regions,
)

NEW_KINDS = ("reconstruction", "mkd", "tsdn", "saliency")
TRAINABLE = ("reconstruction", "mkd", "tsdn")
TILE = 64


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On the shared 2 cores, 2 OpenMP threads made tiny convolutions ~100x slower (spinning threads
    competing with other jobs): this module runs torch on one thread and restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texture(seed: int, size: int = TILE, channels: int = 1) -> np.ndarray:
    """A smooth striped texture with a little noise (uint8 H x W x C)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 60 * np.sin(xx / 3.0 + seed) * np.cos(yy / 5.0)
    img = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], channels, axis=2)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_registered_with_the_core_contract(kind):
    model = create_model(kind, "s").eval()
    assert kind in MODEL_KINDS and model.kind == kind and model.size == "s" and model.map_stride == 4
    assert len(model.map_weights) == model.num_maps and len(model.input_mean) == len(model.input_std) == 3
    with pytest.raises(ValueError, match="unknown size"):
        create_model(kind, "xl")
    for shape in ((2, 3, TILE, TILE), (1, 3, 72, 88)):
        with torch.no_grad():
            out = model(torch.randn(*shape))
        assert out.shape == (shape[0], model.num_maps, shape[2] // 4, shape[3] // 4)
        assert torch.isfinite(out).all() and (out >= -1e-6).all()


@pytest.mark.parametrize("kind", TRAINABLE)
def test_a_few_steps_reduce_the_loss(kind):
    model = create_model(kind, "s")
    # one 32 x 32 image and 32 tiles: every step sees the same crop, so the loss must go down
    history = fit(model, [_texture(0, size=32, channels=3)], TrainConfig(steps=10, tile=32, lr=2e-3,
                                                                          pca_samples=2, seed=1))
    loss = history["loss"]
    assert len(loss) == 10 and np.isfinite(loss).all()
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_tsdn_losses_and_mask_stream():
    model = create_model("tsdn", "s")
    history = fit(model, [_texture(1, channels=3)], TrainConfig(steps=3, tile=TILE, lr=1e-3))
    assert set(history["parts"]) == {"rec", "mask", "fne"}
    streams = model.streams(torch.randn(2, 3, TILE, TILE))
    assert streams["reconstruction"].shape == (2, 3, TILE, TILE)
    assert streams["mask_logits"].shape == (2, 1, TILE, TILE)


def test_saliency_is_zero_shot_and_finds_the_odd_patch(tmp_path):
    model = create_model("saliency", "s", k=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fit(model, [_texture(2)], TrainConfig(steps=100, tile=TILE,
                                                    checkpoint_path=str(tmp_path / "ckpt.pt")))
    assert history["steps"] == 0 and history["loss"] == [] and history["zero_shot"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    restore_model(create_model("saliency", "s", k=8), read_checkpoint(tmp_path / "ckpt.pt"))
    img = _texture(3, size=128, channels=3)
    cv2.circle(img, (88, 40), 10, (255, 255, 255), -1)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.498) / 0.502
    with torch.no_grad():
        sal = model(x)[0, 0].numpy()
    y, xpos = np.unravel_index(np.argmax(sal), sal.shape)
    assert abs(y * 4 - 40) <= 16 and abs(xpos * 4 - 88) <= 16, (y, xpos)


def test_saliency_refuses_a_grid_too_small_for_k():
    with pytest.raises(ValueError, match="fewer than k"):
        create_model("saliency", "s", k=64)(torch.randn(1, 3, 32, 32))


def test_saa_plus_hook_refuses_without_foundation_models():
    prompter = UnconfiguredPrompter()
    assert isinstance(prompter, RegionPrompter)
    with pytest.raises(FoundationModelsUnavailable, match="Grounding DINO"):
        prompter.propose(np.zeros((8, 8, 3), np.uint8), ["crack"])
    sal = np.zeros((8, 8), np.float32)
    sal[:2, :2] = 1.0
    small, other, huge = (np.zeros((32, 32), bool) for _ in range(3))
    small[:8, :8], other[20:28, 20:28], huge[:, :20] = True, True, True
    ranked = rescore_regions([Region(other, 0.9), Region(small, 0.5), Region(huge, 1.0)], sal, max_area=0.3)
    assert [r.confidence for r, _ in ranked] == [0.5, 0.9]  # huge dropped; saliency outranks confidence
    assert ranked[0][1] == pytest.approx(0.5) and ranked[1][1] == 0.0


# ---------------------------------------------------------------- SLIC and superpixel random filling

def test_slic_covers_the_image_with_about_the_requested_count():
    img = _texture(4, size=96, channels=3)
    for n in (16, 64):
        labels = slic(img, n_segments=n)
        assert labels.shape == img.shape[:2] and labels.dtype == np.int32
        assert labels.min() == 0 and set(np.unique(labels)) == set(range(labels.max() + 1))
        assert 0.6 * n <= labels.max() + 1 <= 1.3 * n, (n, labels.max() + 1)


def test_slic_superpixels_are_connected_and_follow_edges():
    img = np.full((80, 80, 3), 40, np.uint8)
    img[:, 37:] = 220  # a vertical edge off the seed grid
    labels = slic(img, n_segments=25)
    for value in np.unique(labels):
        count, _ = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=4)
        assert count == 2, f"superpixel {value} is in {count - 1} pieces"
        sides = np.unique(img[labels == value][:, 0])
        assert len(sides) == 1, f"superpixel {value} straddles the edge"


def test_slic_validates_input():
    with pytest.raises(ValueError, match="uint8"):
        slic(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="n_segments"):
        slic(np.zeros((8, 8), np.uint8), n_segments=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_random_fill_paints_whole_superpixels(channels):
    img = _texture(5, size=96, channels=channels)
    if channels == 3:
        img[..., 1] //= 2  # a colour image
    rng = np.random.default_rng(0)
    for _ in range(5):
        out, mask = random_fill(img, rng, n_segments=36, max_fraction=0.2)
        changed = (out != img).any(axis=2)
        assert mask.shape == img.shape[:2] and mask.dtype == np.float32 and 0 < mask.mean() <= 0.5
        assert not changed[mask == 0].any() and changed[mask > 0].mean() > 0.9
        if channels == 1:
            assert out.shape == img.shape
    grey = np.repeat(_texture(6, size=96), 3, axis=2)
    out, _ = random_fill(grey, rng, slic_scale=0.5)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


# ---------------------------------------------------------------- edge-train -> bundle -> ONNX parity

@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), _texture(10 + i, size=80))
    return folder


def _train(kind: str, folder, out) -> dict:
    from trainer.cli import build_parser, train_bundle

    args = build_parser().parse_args(["train", "--folder", str(folder), "--kind", kind, "--tile", str(TILE),
                                      "--steps", "2", "--val-fraction", "0.34", "--out", str(out)])
    return train_bundle(args, progress=False)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_edge_train_bundle_and_onnx_parity(kind, good_folder, tmp_path):
    metrics = _train(kind, good_folder, tmp_path)
    meta = read_bundle(tmp_path)
    assert meta.kind == kind and meta.input.height == TILE and meta.input.channels == 1
    assert meta.map.height == TILE // 4 and len(meta.map.q_a) == create_model(kind).num_maps
    assert metrics["training"]["steps"] == (0 if kind == "saliency" else 2)
    model = restore_model(create_model(kind, "s"), read_checkpoint(tmp_path / "checkpoint.pt")).eval()
    tiles = np.stack([_texture(30 + i)[:TILE, :TILE] for i in range(3)])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: tiles})[0]
    with torch.no_grad():
        want = DeployModel(model, meta.input, meta.map)(torch.from_numpy(tiles)).numpy()
    assert got.shape == (3, 1, TILE // 4, TILE // 4) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ---------------------------------------------------------------- through the real daemon

# reconstruction in the default run (~3 s); the other kinds in the slow set (~2-5 s each, a daemon each)
DAEMON_CASES = [pytest.param(k, marks=[] if k == "reconstruction" else [pytest.mark.slow]) for k in NEW_KINDS]


@pytest.mark.parametrize("kind", DAEMON_CASES)
def test_new_kind_bundle_through_the_daemon(kind, good_folder, tmp_path):
    """Each new kind end to end: edge-train bundle -> daemon (ONNX Runtime worker) -> verdicts and maps."""
    from daemon_helpers import DaemonProcess, collect, daemon_config, handshake

    from edge_daemon.client import FramePublisher, VerdictSubscriber

    bundle = tmp_path / "bundle"
    _train(kind, good_folder, bundle)
    model_id = read_bundle(bundle).model_id
    path, data = daemon_config(tmp_path, bundle, cameras=[{"id": "cam1"}])
    proc = DaemonProcess(path, tmp_path / "daemon.log", instance=data["instance"])
    try:
        proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=45)
        ep = data["endpoints"]
        with VerdictSubscriber(ep["output"], maps=True) as sub, FramePublisher(ep["ingest"], "cam1") as cam:
            records, probes = handshake(cam, sub, _texture(40, size=96)[:, :, 0])
            defect = _texture(41, size=96)[:, :, 0].copy()
            cv2.circle(defect, (48, 48), 12, 255, -1)
            fid = cam.send(defect, frame_id=10_000)
            items = collect(sub, 40, 20.0, until=lambda got: any(getattr(v, "frame_id", None) == fid
                                                                 and hasattr(v, "map") for v in got))
        verdicts = [v for v in records + items if getattr(v, "kind", None) == "verdict"]
        maps = [m for m in items if hasattr(m, "map") and m.frame_id == fid]
        assert verdicts and all(v.model_id == model_id and v.model_id.startswith(f"{kind}-s")
                                for v in verdicts)
        probe = next(v for v in verdicts if v.frame_id in probes)
        bad = next(v for v in verdicts if v.frame_id == fid)
        assert np.isfinite([probe.score, bad.score]).all()
        if kind in ("reconstruction", "saliency"):  # meaningful after 2 steps / zero-shot
            assert bad.score > probe.score  # the painted disc is unlike the texture
        assert maps and np.isfinite(maps[0].map).all() and maps[0].map.dtype == np.float32
        assert proc.terminate(timeout_s=30) == 0, proc.logs()
    finally:
        proc.stop()
