"""Model registry: shapes, gradients, state completeness and ONNX / torch.export of EfficientAD and DFR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.bundle import BundleMeta, InputSpec, MapSpec
from engines.graph import DeployModel
from trainer.models import MODEL_KINDS, MODEL_SIZES, create_model, pca_latent_dim

VARIANTS = [(kind, size) for kind in MODEL_KINDS for size in MODEL_SIZES[kind]]


def build(kind: str, size: str, hw: tuple[int, int], seed: int = 0):
    torch.manual_seed(seed)
    options = {"tile": hw} if kind == "efficientad" else {"latent": 8} if kind == "dfr" else {}
    if kind == "patchcore":
        options = {"min_bank": 32, "seed": seed}
    model = create_model(kind, size, **options)
    if kind == "patchcore":  # the bank is the model: fit one on a random batch
        model.fit_bank([torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))])
    return model


def shape_cases():
    for kind, size in VARIANTS:
        for hw in [(64, 64), (64, 96), (256, 256)]:
            slow = hw == (256, 256) or (size == "m" and hw != (64, 64))
            yield pytest.param(kind, size, hw, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("kind", "size", "hw"), list(shape_cases()))
def test_raw_maps_shape_no_nans_and_backward(kind, size, hw):
    model = build(kind, size, hw).train()
    x = torch.randn(1, 3, *hw)
    maps = model(x)
    assert maps.shape == (1, model.num_maps, hw[0] // 4, hw[1] // 4)
    assert model.map_stride == 4
    assert len(model.map_weights) == model.num_maps
    assert len(model.input_mean) == 3 and len(model.input_std) == 3
    assert torch.isfinite(maps).all()
    if kind in ("saliency", "patchcore"):  # zero-shot / memory bank: nothing to train by gradient
        assert not any(p.requires_grad for p in model.parameters())
        return
    maps.mean().backward()
    grads = [p.grad for n, p in model.named_parameters()
             if p.requires_grad and not n.startswith("mask_decoder.")]  # TSDN: training-only stream
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", ["efficientad", "dfr"])
def test_full_size_forward(kind):
    model = build(kind, "s", (256, 256)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 256, 256))
    assert maps.shape == (1, model.num_maps, 64, 64) and torch.isfinite(maps).all()


def test_unknown_kind_or_size_names_the_valid_ones():
    with pytest.raises(ValueError, match="efficientad"):
        create_model("padim")
    with pytest.raises(ValueError, match=r"\['m', 's'\]"):
        create_model("efficientad", "xl")
    with pytest.raises(ValueError, match=r"\['s'\]"):
        create_model("dfr", "m")


def test_efficientad_options_and_input_check():
    model = create_model("efficientad", "s", tile=64, alpha=0.7)
    assert model.map_weights == pytest.approx((0.7, 0.3))
    with pytest.raises(ValueError, match="tile"):
        model(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("efficientad", tile=100)
    padded = create_model("efficientad", "s", tile=64, padded=True).eval()
    assert padded(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 16, 16)


def test_dfr_without_latent_explains_itself():
    model = create_model("dfr")
    assert model.autoencoder is None
    with pytest.raises(RuntimeError, match="latent"):
        model(torch.zeros(1, 3, 64, 64))
    coarse = create_model("dfr", latent=4, grid_stride=4, reflect_pad=1).eval()
    assert coarse(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize(("kind", "size"), VARIANTS)
def test_state_dict_is_complete(kind, size):
    source = build(kind, size, (64, 64), seed=1).eval()
    if kind == "efficientad":
        source.teacher_mean.normal_()
        source.teacher_std.uniform_(0.5, 2.0)
        source.teacher_trained.fill_(True)
        assert {"teacher_mean", "teacher_std", "teacher_trained"} <= set(source.state_dict())
    target = build(kind, size, (64, 64), seed=2).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_pca_latent_dim_finds_the_rank():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 20, generator=gen)).Q[:, :3]
    feats = torch.randn(500, 3, generator=gen) @ basis.T + 1e-3 * torch.randn(500, 20, generator=gen)
    assert pca_latent_dim(feats, 0.9) == 3
    assert pca_latent_dim(feats, 0.3) == 1
    with pytest.raises(ValueError):
        pca_latent_dim(feats[:1], 0.9)


def _meta(model, tile: int) -> BundleMeta:
    k = model.num_maps
    return BundleMeta(
        kind=model.kind, size=model.size,
        input=InputSpec(height=tile, width=tile, channels=3, mean=model.input_mean, std=model.input_std),
        map=MapSpec(height=tile // 4, width=tile // 4, stride=4, q_a=(0.0,) * k, q_b=(1.0,) * k,
                    weights=model.map_weights),
        image_threshold=0.5, pixel_threshold=0.5)


@pytest.mark.parametrize("kind", ["efficientad", "dfr"])
def test_export_bundle_onnx_matches_torch(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from engines.graph import export_bundle

    model = build(kind, "s", (64, 64)).eval()
    meta = export_bundle(model, _meta(model, 64), tmp_path)
    assert (tmp_path / "core.pt2").is_file() and meta.kind == kind
    tiles = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: tiles})
    with torch.no_grad():
        torch_out = DeployModel(model, meta.input, meta.map).eval()(torch.from_numpy(tiles)).numpy()
    assert onnx_out.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-5 * float(np.abs(torch_out).max()))
    program = torch.export.load(str(tmp_path / "core.pt2"))
    x = DeployModel(model, meta.input, meta.map).preprocess(torch.from_numpy(tiles))
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-6)
