"""TensorRT: all around the library runs here; what needs tensorrt + a GPU is skipped (reason given)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines import BackendUnavailable, open_engine
from engines.build import BuildTarget, cache_status, engine_cache_key, engine_paths, optimisation_profiles

TARGET = BuildTarget("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0")
TILE = (256, 256, 3)


def _key(**changes):
    args = dict(onnx_sha256="a" * 64, target=TARGET, precision="fp16", tile_shape=TILE,
                profiles=optimisation_profiles(2, 16))
    args.update(changes)
    return engine_cache_key(**args)


def test_profiles_one_per_stream():
    assert optimisation_profiles(2, 16) == ((1, 16, 16), (1, 16, 16))
    assert optimisation_profiles(1, 1) == ((1, 1, 1),)
    with pytest.raises(ValueError):
        optimisation_profiles(0, 16)


def test_cache_key_is_stable_and_changes_with_every_component():
    base = _key()
    assert base == _key() and base.startswith("fp16-")
    variants = [
        _key(onnx_sha256="b" * 64),
        _key(target=dataclasses.replace(TARGET, gpu_name="NVIDIA L4")),
        _key(target=dataclasses.replace(TARGET, compute_capability=(8, 9))),
        _key(target=dataclasses.replace(TARGET, tensorrt_version="11.0.0")),
        _key(precision="fp32"),
        _key(tile_shape=(128, 128, 3)),
        _key(profiles=optimisation_profiles(3, 16)),
        _key(profiles=optimisation_profiles(2, 32)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_engine_paths(tmp_path):
    engine, sidecar = engine_paths(tmp_path, "fp16-abc")
    assert engine.name == "fp16-abc.engine" and sidecar.name == "fp16-abc.json" and engine.parent == tmp_path


def test_cache_status_with_a_given_target(tiny_bundle, tmp_path):
    status = cache_status(tiny_bundle, cache_dir=tmp_path, target=TARGET)
    assert status["bundle_ok"] and not status["engine_cached"]
    (tmp_path / status["engine"].rsplit("/", 1)[1]).write_bytes(b"engine")
    assert cache_status(tiny_bundle, cache_dir=tmp_path, target=TARGET)["engine_cached"]
    other = cache_status(tiny_bundle, cache_dir=tmp_path, target=dataclasses.replace(TARGET, gpu_name="L4"))
    assert not other["engine_cached"]


def test_without_tensorrt_the_backend_is_unavailable(tiny_bundle):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="tensorrt package cannot be imported"):
            open_engine(tiny_bundle, backend="tensorrt")
    else:
        pytest.skip("tensorrt is installed here")


def test_tensorrt_matches_onnxruntime(tiny_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (CPU-only machine); not run")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT installed but no CUDA device")
    tiles = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    ref = open_engine(tiny_bundle, backend="onnxruntime", max_batch=4)
    for precision, tol in (("fp32", 1e-4), ("fp16", 2e-3)):
        trt = open_engine(tiny_bundle, backend="tensorrt", precision=precision, max_batch=4,
                          cache_dir=tmp_path)
        trt.warmup()
        np.testing.assert_allclose(trt.infer(tiles), ref.infer(tiles), rtol=1e-2, atol=tol)
        handles = [trt.submit(tiles[: i + 1], slot=i % 2) for i in range(4)]
        for i, h in enumerate(handles):
            assert h.result().shape == (i + 1, 1, 8, 8)
        trt.close()
    ref.close()
    assert list(tmp_path.glob("*.engine")) and (tmp_path / "timing.cache").is_file()
