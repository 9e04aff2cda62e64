"""TensorRT: all around the library runs here; what needs tensorrt + a GPU is skipped (reason given).

The build and the engine run here against a fake tensorrt module (tests/cuda_fakes.py: its "engine" runs the
prepared ONNX graph in ONNX Runtime at the raw buffer addresses it was given) with faked CUDA calls: timing
cache keys and mismatches, import order, device, TF32 flag, per-slot bindings, closed-engine behaviour.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import weakref

import numpy as np
import pytest
import torch

import engines
from engines import BackendUnavailable, EngineError, open_engine
from engines import build as build_module
from engines.build import (
    BuildTarget,
    build_engine,
    cache_status,
    engine_cache_key,
    engine_paths,
    optimisation_profiles,
    timing_cache_path,
)
from engines.bundle import read_bundle
from engines.tensorrt_ import TensorRTEngine
from tests.cuda_fakes import FakeCudaOps, FakeTensorRT

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


@pytest.mark.gpu_only
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
    assert list(tmp_path.glob("*.engine")) and list(tmp_path.glob("timing-*.cache"))


# --- against the fake tensorrt (runs everywhere) ----------------------------------------------------------

@pytest.fixture
def fake_trt(monkeypatch):
    trt = FakeTensorRT()
    targets = {"cuda:0": BuildTarget("FakeGPU", (9, 0), trt.__version__),
               "cuda:1": BuildTarget("OtherGPU", (8, 9), trt.__version__)}
    monkeypatch.setattr(build_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(build_module, "current_target", lambda device="cuda:0": targets[device])
    monkeypatch.setattr(build_module, "_device_context", trt.device_context)
    trt.targets = targets
    return trt


def _open_fake(bundle, cache, trt, precision="fp32", streams=2, max_batch=4, ops=None):
    path = build_engine(bundle, precision=precision, streams=streams, max_batch=max_batch, cache_dir=cache)
    return TensorRTEngine(path, read_bundle(bundle), precision=precision, streams=streams,
                          max_batch=max_batch, ops=ops or FakeCudaOps(), trt=trt)


def _reference(bundle):
    engine = open_engine(bundle, backend="onnxruntime", max_batch=16, threads=1)
    return engine


def test_timing_cache_is_keyed_by_gpu_and_version(tmp_path):
    paths = {timing_cache_path(tmp_path, TARGET),
             timing_cache_path(tmp_path, dataclasses.replace(TARGET, gpu_name="NVIDIA L4")),
             timing_cache_path(tmp_path, dataclasses.replace(TARGET, compute_capability=(8, 9))),
             timing_cache_path(tmp_path, dataclasses.replace(TARGET, tensorrt_version="11.0.0"))}
    assert len(paths) == 4 and all(p.parent == tmp_path and p.suffix == ".cache" for p in paths)
    assert timing_cache_path(tmp_path, TARGET) == timing_cache_path(tmp_path, TARGET)


def test_stale_timing_cache_is_rebuilt_not_fatal(tiny_bundle, tmp_path, fake_trt):
    timing = timing_cache_path(tmp_path, fake_trt.targets["cuda:0"])
    timing.write_bytes(b"a timing cache from another GPU or TensorRT version")
    engine_file = build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path)
    assert engine_file.is_file() and fake_trt.timing_loads == [b"<refused>", b""]
    assert timing.read_bytes() == fake_trt.timing_blob()  # replaced by a valid one
    again = build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path, rebuild=True)
    assert again == engine_file and fake_trt.timing_loads[-1] == fake_trt.timing_blob()  # and used next time


def test_cached_engine_opens_without_onnx(tiny_bundle, tmp_path, fake_trt, monkeypatch):
    cached = build_engine(tiny_bundle, precision="fp16", max_batch=4, cache_dir=tmp_path)
    for name in [m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "onnxconverter_common"))
                 or m == "engines.fp16"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(engines, "fp16", raising=False)
    monkeypatch.setitem(sys.modules, "onnx", None)  # a [trt]-only install: import onnx fails
    assert build_engine(tiny_bundle, precision="fp16", max_batch=4, cache_dir=tmp_path) == cached
    with pytest.raises(BackendUnavailable, match="onnx"):
        build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path)


def test_builder_runs_with_the_engine_device_current(tiny_bundle, tmp_path, fake_trt):
    build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path, device="cuda:1")
    assert fake_trt.builds[-1]["device"] == "cuda:1"
    ops = FakeCudaOps()
    engine = TensorRTEngine(build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path,
                                         device="cuda:1"), read_bundle(tiny_bundle), device="cuda:1",
                            precision="fp32", max_batch=4, ops=ops, trt=fake_trt)
    assert {entry[2] for entry in ops.calls("stream")} == {"cuda:1"}
    engine.close()


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("fp16", False)])
def test_fp32_means_no_tf32(tiny_bundle, tmp_path, fake_trt, precision, tf32):
    build_engine(tiny_bundle, precision=precision, max_batch=4, cache_dir=tmp_path)
    assert fake_trt.builds[-1]["tf32"] is tf32


def test_two_contexts_with_different_batches_value_by_value(tiny_bundle, tmp_path, fake_trt):
    reference = _reference(tiny_bundle)
    engine = _open_fake(tiny_bundle, tmp_path, fake_trt, precision="fp32", streams=2, max_batch=4)
    a = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    b = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    first, second = engine.submit(a, slot=0), engine.submit(b, slot=1)  # both in flight
    np.testing.assert_allclose(second.result(), reference.infer(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.result(), reference.infer(a), rtol=1e-5, atol=1e-6)
    engine.close()
    reference.close()


def test_fp16_engine_on_the_prepared_graph(tiny_bundle, tmp_path, fake_trt):
    reference = _reference(tiny_bundle)
    engine = _open_fake(tiny_bundle, tmp_path, fake_trt, precision="fp16", max_batch=4)
    tiles = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_allclose(engine.infer(tiles), reference.infer(tiles), rtol=1e-2, atol=2e-3)
    engine.close()
    reference.close()


def test_torch_tiles_held_and_recorded(tiny_bundle, tmp_path, fake_trt):
    ops = FakeCudaOps()
    engine = _open_fake(tiny_bundle, tmp_path, fake_trt, ops=ops)
    tiles = torch.cat([torch.zeros((1, 32, 32, 1), dtype=torch.uint8), torch.full((2, 32, 32, 1), 200,
                                                                                    dtype=torch.uint8)])
    address, alive = tiles.data_ptr(), weakref.ref(tiles)
    handle = engine.submit(tiles, slot=1)
    del tiles
    gc.collect()
    assert alive() is not None and ("record_stream", address, engine._slots[1].stream.name) in ops.log
    out = handle.result()
    gc.collect()
    assert alive() is None and tuple(out.shape) == (3, 1, 8, 8)
    engine.close()


def test_closed_engine_raises_engine_error(tiny_bundle, tmp_path, fake_trt):
    engine = _open_fake(tiny_bundle, tmp_path, fake_trt)
    engine.warmup()
    engine.close()
    engine.close()
    tiles = np.zeros((1, 32, 32, 1), np.uint8)
    for call in (lambda: engine.infer(tiles), lambda: engine.submit(tiles, 0), engine.warmup):
        with pytest.raises(EngineError, match="closed"):
            call()


def test_each_slot_has_its_own_profile_and_buffers(tiny_bundle, tmp_path, fake_trt):
    engine = _open_fake(tiny_bundle, tmp_path, fake_trt, streams=3, max_batch=2)
    contexts = [slot.context for slot in engine._slots]
    assert sorted(c.profile for c in contexts) == [0, 1, 2]
    assert len({c.stream for c in contexts}) == 3
    addresses = [tuple(c.addresses.values()) for c in contexts]
    assert len({a for pair in addresses for a in pair}) == 6
    engine.close()


# --- on a GPU with TensorRT (skipped here) ---------------------------------------------------------------

def _real_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (CPU-only machine); not run")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT installed but no CUDA device")


@pytest.mark.gpu_only
def test_gpu_two_contexts_value_by_value_and_torch_temporaries(tiny_bundle, tmp_path):
    _real_tensorrt()
    reference = _reference(tiny_bundle)
    engine = open_engine(tiny_bundle, backend="tensorrt", precision="fp32", streams=2, max_batch=16,
                         cache_dir=tmp_path)
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (b, 32, 32, 1), dtype=np.uint8) for b in (16, 3, 9, 16, 1, 7)]
    handles = []
    for i, tiles in enumerate(batches):
        handles.append(engine.submit(torch.cat([torch.from_numpy(t).cuda() for t in np.split(tiles, [1])]),
                                     slot=i % 2))  # a temporary, dropped at once
        torch.empty((16, 32, 32, 1), dtype=torch.uint8, device="cuda").fill_(255)
    for tiles, handle in zip(batches, handles, strict=True):
        np.testing.assert_allclose(handle.result().cpu().numpy(), reference.infer(tiles), rtol=1e-4,
                                   atol=1e-5)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(batches[0])
    reference.close()


@pytest.mark.gpu_only
def test_gpu_second_build_against_a_stale_timing_cache(tiny_bundle, tmp_path):
    _real_tensorrt()
    from engines.build import current_target

    timing = timing_cache_path(tmp_path, current_target("cuda:0"))
    timing.write_bytes(b"not a timing cache")
    first = build_engine(tiny_bundle, precision="fp16", max_batch=4, cache_dir=tmp_path)
    assert first.is_file() and timing.read_bytes() != b"not a timing cache"
    second = build_engine(tiny_bundle, precision="fp32", max_batch=4, cache_dir=tmp_path)
    assert second.is_file() and second != first
    engine = open_engine(tiny_bundle, backend="tensorrt", precision="fp16", max_batch=4, cache_dir=tmp_path)
    assert engine.infer(np.zeros((2, 32, 32, 1), np.uint8)).shape == (2, 1, 8, 8)
    engine.close()


@pytest.mark.gpu_only
def test_gpu_fp16_ood_tiles_finite_and_fail(tmp_path):
    _real_tensorrt()
    from inspection.pipeline import InspectConfig, inspect_frame
    from tests.fp16_stress import good_tiles, ood_tiles, stress_bundle

    for name in ("student-teacher", "reconstruction"):
        bundle = stress_bundle(name, tmp_path / name)
        full = open_engine(bundle, backend="tensorrt", precision="fp32", max_batch=8, cache_dir=tmp_path)
        half = open_engine(bundle, backend="tensorrt", precision="fp16", max_batch=8, cache_dir=tmp_path)
        tiles = np.concatenate([good_tiles(2), ood_tiles()])
        ref, out = full.infer(tiles), half.infer(tiles)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, rtol=1e-2, atol=2e-3 * float(np.abs(ref).max()))
        for tile in ood_tiles():
            result = inspect_frame(half, np.tile(tile, (2, 2, 1)), InspectConfig(tile_overlap=8))
            assert result.verdict == "FAIL" and np.isfinite(result.score)
        full.close()
        half.close()
