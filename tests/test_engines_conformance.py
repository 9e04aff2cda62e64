"""Every backend available here against the same Engine contract (engines/base.py)."""

from __future__ import annotations

import gc
import logging
import shutil

import numpy as np
import pytest
import torch

from engines import (
    BackendUnavailable,
    BundleError,
    Engine,
    EngineError,
    EngineInputError,
    open_engine,
    registry,
)
from engines.base import batch_buckets, bucket_for
from engines.bundle import read_bundle
from engines.cpuinfo import bf16_isa, read_cpuinfo
from engines.graph import DeployModel
from tests.conftest import TinyCore

MAX_BATCH = 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
TRT = pytest.mark.skipif(registry.tensorrt_missing_reason() is not None,
                         reason=f"TensorRT unusable here: {registry.tensorrt_missing_reason()}")
OPENVINO = pytest.mark.skipif(not registry.openvino_available(), reason="openvino is not installed")
BF16 = pytest.mark.skipif(bf16_isa(read_cpuinfo().flags) is None,
                          reason=f"needs AMX-BF16 or AVX512-BF16; this CPU: {read_cpuinfo().summary()}")
CASES = [
    pytest.param(("onnxruntime", "cpu", None), id="onnxruntime-cpu"),
    pytest.param(("onnxruntime", "cpu", "int8"), id="onnxruntime-int8"),
    pytest.param(("openvino", "cpu", None), id="openvino-cpu", marks=OPENVINO),
    pytest.param(("openvino", "cpu", "bf16"), id="openvino-bf16", marks=[OPENVINO, BF16]),
    pytest.param(("openvino", "cpu", "int8"), id="openvino-int8", marks=OPENVINO),
    pytest.param(("torch", "cpu", None), id="torch-cpu"),
    # the CUDA code paths with the CUDA calls faked and tensors on the CPU (tests/cuda_fakes.py)
    pytest.param(("torch", "fake-cuda", "fp32"), id="torch-fakecuda-fp32"),
    pytest.param(("torch", "fake-cuda", "fp16"), id="torch-fakecuda-fp16"),
    pytest.param(("tensorrt", "fake-cuda", "fp16"), id="tensorrt-fake-fp16"),
    pytest.param(("torch", "cuda", "fp32"), id="torch-cuda-fp32", marks=[CUDA, pytest.mark.gpu_only]),
    pytest.param(("torch", "cuda", "fp16"), id="torch-cuda-fp16", marks=[CUDA, pytest.mark.gpu_only]),
    pytest.param(("tensorrt", "cuda", "fp32"), id="tensorrt-fp32", marks=[TRT, pytest.mark.gpu_only]),
    pytest.param(("tensorrt", "cuda", "fp16"), id="tensorrt-fp16", marks=[TRT, pytest.mark.gpu_only]),
]


def _tiles(batch, shape=(32, 32, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, *shape), dtype=np.uint8)


def _textures(batch, seed=5):
    from trainer.data.synthetic import textured_image

    rng = np.random.default_rng(seed)
    return np.stack([textured_image(32, rng, channels=1) for _ in range(batch)])


def _tolerance(engine, span: float = 1.0):
    """Against the FP32 reference graph; reduced precisions relative to the map's value range ``span``."""
    if engine.precision == "int8":
        return dict(rtol=0, atol=0.05 * span)  # 8-bit activations, 7-bit weights
    if engine.precision == "bf16":
        return dict(rtol=2e-2, atol=1e-2 * span)  # 8-bit mantissa
    return dict(rtol=1e-2, atol=2e-3) if engine.precision == "fp16" else dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trt_cache(tmp_path_factory):
    """One TensorRT cache folder for the module: engines are built once and then come from the cache."""
    return tmp_path_factory.mktemp("trt-cache")


def _fake_cuda_engine(request, bundle, backend, precision, cache):
    from engines.bundle import read_bundle
    from tests.cuda_fakes import FakeCudaOps

    meta = read_bundle(bundle)
    if backend == "torch":
        from engines.torch_ import TorchEngine

        return TorchEngine(bundle / meta.files["torch"]["path"], meta, device="cuda:0", precision=precision,
                           streams=2, max_batch=MAX_BATCH, cuda_graphs=False, ops=FakeCudaOps())
    from engines import build
    from engines.build import BuildTarget
    from engines.tensorrt_ import TensorRTEngine
    from tests.cuda_fakes import FakeTensorRT

    trt, monkeypatch = FakeTensorRT(), request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(build, "import_tensorrt", lambda: trt)
    target = BuildTarget("FakeGPU", (9, 0), trt.__version__)
    monkeypatch.setattr(build, "current_target", lambda device: target)
    monkeypatch.setattr(build, "_device_context", trt.device_context)
    path = build.build_engine(bundle, precision=precision, streams=2, max_batch=MAX_BATCH, cache_dir=cache)
    return TensorRTEngine(path, meta, precision=precision, streams=2, max_batch=MAX_BATCH, ops=FakeCudaOps(),
                          trt=trt)


@pytest.fixture(params=CASES)
def engine(request, tiny_bundle, trt_cache):
    backend, device, precision = request.param
    if device == "fake-cuda":
        eng = _fake_cuda_engine(request, tiny_bundle, backend, precision, trt_cache / "fake")
    else:
        bundle = request.getfixturevalue("tiny_bundle_int8") if precision == "int8" else tiny_bundle
        eng = open_engine(bundle, backend=backend, device=device, precision=precision, streams=2,
                          max_batch=MAX_BATCH, threads=1, cache_dir=trt_cache)
        if device in (None, "cpu"):
            assert eng.precision == (precision or "fp32")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    meta = read_bundle(tiny_bundle)
    model = DeployModel(TinyCore(), meta.input, meta.map).eval()

    def run(tiles):
        with torch.inference_mode():
            return model(torch.from_numpy(tiles)).numpy()

    return run


def test_protocol_and_shapes(engine):
    assert isinstance(engine, Engine)
    assert engine.input_shape == (32, 32, 1) and engine.map_shape == (8, 8)
    assert engine.max_batch == MAX_BATCH and engine.streams == 2
    for batch in (1, MAX_BATCH):
        out = engine.infer(_tiles(batch))
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (batch, 1, 8, 8)


def test_matches_reference_graph(engine, reference):
    # INT8 activation ranges come from calibration on textures (tiny_bundle_int8): compare on such tiles,
    # uniform noise lies outside them and is clipped
    tiles = _textures(3) if engine.precision == "int8" else _tiles(3)
    want = reference(tiles)
    np.testing.assert_allclose(engine.infer(tiles), want, **_tolerance(engine, float(np.ptp(want))))


def test_each_call_returns_a_new_array(engine):
    first = engine.infer(_tiles(2, seed=1))
    kept = first.copy()
    second = engine.infer(_tiles(2, seed=2))
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)  # the second call did not overwrite the first result


def test_submit_on_every_slot_matches_infer(engine):
    batches = [_tiles(b, seed=b) for b in (1, 2, 3, 4)]
    handles = [engine.submit(tiles, slot=i % engine.streams) for i, tiles in enumerate(batches)]
    for tiles, handle in zip(batches, handles, strict=True):
        np.testing.assert_allclose(handle.result(), engine.infer(tiles), rtol=1e-6, atol=1e-7)
        assert handle.done()


def test_busy_slot_keeps_earlier_result(engine):
    a, b = _tiles(2, seed=3), _tiles(2, seed=4)
    first = engine.submit(a, slot=0)
    second = engine.submit(b, slot=0)  # waits for / copies out the first batch before reusing the slot
    np.testing.assert_allclose(first.result(), engine.infer(a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(second.result(), engine.infer(b), rtol=1e-6, atol=1e-7)


def test_submit_copies_the_callers_tiles(engine):
    tiles = _tiles(2, seed=5)
    expected = engine.infer(tiles)
    handle = engine.submit(tiles, slot=1)
    tiles[:] = 0  # the caller reuses its buffer at once
    np.testing.assert_allclose(handle.result(), expected, rtol=1e-6, atol=1e-7)


def _torch_tiles(engine, tiles):
    """torch tiles where the engine wants them: its CUDA device, or the CPU for CPU and faked-CUDA engines."""
    device = engine.device if torch.cuda.is_available() and str(engine.device).startswith("cuda") else "cpu"
    return torch.from_numpy(tiles).to(device)


def test_submit_torch_temporaries_dropped_at_once(engine):
    if engine.backend in ("onnxruntime", "openvino"):
        pytest.skip(f"the {engine.backend} backend takes NumPy tiles only (engines/base.py)")
    batches = [_tiles(b, seed=20 + b) for b in (4, 1, 3, 4)]
    expected = [engine.infer(t) for t in batches]
    handles = []
    for i, tiles in enumerate(batches):  # each a torch.cat temporary the caller drops at once, as the batcher
        handles.append(engine.submit(torch.cat([_torch_tiles(engine, t) for t in np.split(tiles, [1])]),
                                     slot=i % engine.streams))
    gc.collect()
    for handle, want in zip(handles, expected, strict=True):
        out = handle.result()
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-6, atol=1e-7)


def test_second_slot_values_not_just_shapes(engine):
    a, b = _tiles(3, seed=30), _tiles(4, seed=31)
    handles = [engine.submit(a, slot=0), engine.submit(b, slot=1)]  # two contexts/streams, two batch sizes
    np.testing.assert_allclose(handles[1].result(), engine.infer(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(handles[0].result(), engine.infer(a), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad, reason", [
    (np.zeros((2, 32, 32, 1), np.float32), "uint8"),
    (np.zeros((2, 32, 31, 1), np.uint8), "B x 32 x 32 x 1"),
    (np.zeros((32, 32, 1), np.uint8), "B x 32 x 32 x 1"),
    (np.zeros((2, 32, 32, 3), np.uint8), "B x 32 x 32 x 1"),
    (np.zeros((MAX_BATCH + 1, 32, 32, 1), np.uint8), "max_batch"),
    (np.zeros((0, 32, 32, 1), np.uint8), "max_batch"),
    ([[1, 2]], "uint8|NumPy"),
])
def test_bad_input_raises_with_reason(engine, bad, reason):
    with pytest.raises(EngineInputError, match=reason):
        engine.infer(bad)
    with pytest.raises(EngineInputError, match=reason):
        engine.submit(bad, slot=0)


def test_bad_slot(engine):
    with pytest.raises(EngineInputError, match="slot"):
        engine.submit(_tiles(1), slot=engine.streams)


def test_warmup_then_close(engine):
    engine.warmup()
    assert engine.infer(_tiles(1)).shape == (1, 1, 8, 8)
    engine.close()
    engine.close()  # idempotent
    for call in (lambda: engine.infer(_tiles(1)), lambda: engine.submit(_tiles(1), 0), engine.warmup):
        with pytest.raises(EngineError, match="closed"):
            call()


def test_onnxruntime_and_torch_agree_tightly(tiny_bundle):
    tiles = _tiles(MAX_BATCH, seed=7)
    ort = open_engine(tiny_bundle, backend="onnxruntime", max_batch=MAX_BATCH, threads=1)
    pt = open_engine(tiny_bundle, backend="torch", device="cpu", max_batch=MAX_BATCH)
    try:
        np.testing.assert_allclose(ort.infer(tiles), pt.infer(tiles), rtol=1e-4, atol=1e-5)
    finally:
        ort.close()
        pt.close()


@pytest.mark.slow
def test_efficientad_s_bundle_agrees(tmp_path):
    """An (untrained) EfficientAD-S bundle at 64x64: ONNX Runtime vs torch FP32."""
    from edge_daemon.bench.engine import synthetic_bundle

    bundle, _source = synthetic_bundle(tmp_path / "effad", tile=64, channels=3)
    tiles = _tiles(2, shape=(64, 64, 3), seed=8)
    engines = [open_engine(bundle, backend=b, device="cpu", max_batch=2, streams=1)
               for b in ("onnxruntime", "torch")]
    try:
        ort_out, torch_out = (e.infer(tiles) for e in engines)
        assert ort_out.shape == (2, 1, 16, 16)
        scale = max(1.0, float(np.abs(torch_out).max()))
        np.testing.assert_allclose(ort_out, torch_out, rtol=1e-4, atol=1e-5 * scale)
    finally:
        for e in engines:
            e.close()


# --- opening: errors and the auto choice ------------------------------------------------------------------

def test_missing_and_corrupt_bundle(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_engine(tmp_path / "nope", backend="onnxruntime")
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "core.pt2", "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(BundleError, match="sha256"):
        open_engine(copy, backend="torch", device="cpu")


def test_unknown_backend(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="unknown backend 'tflite'"):
        open_engine(tiny_bundle, backend="tflite")


@pytest.mark.skipif(registry.tensorrt_missing_reason() is None, reason="TensorRT is usable here")
def test_tensorrt_unavailable_names_the_reason(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        open_engine(tiny_bundle, backend="tensorrt")


@pytest.mark.parametrize("backend, device, precision, reason", [
    ("torch", "cpu", "fp16", "not available on cpu"),
    ("onnxruntime", None, "fp16", "runs fp32, int8"),
    ("onnxruntime", None, "bf16", "runs fp32, int8"),
    ("onnxruntime", None, "int8", "carries no int8 model"),
    ("onnxruntime", "cuda", None, "cpu only"),
    ("torch", "tpu", None, "unknown device"),
])
def test_unavailable_device_or_precision(tiny_bundle, backend, device, precision, reason):
    with pytest.raises(BackendUnavailable, match=reason):
        open_engine(tiny_bundle, backend=backend, device=device, precision=precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="no CUDA"):
        open_engine(tiny_bundle, backend="torch", device="cuda")


def test_unknown_backend_option(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="no options"):
        open_engine(tiny_bundle, backend="onnxruntime", cuda_graphs=False)


@pytest.mark.parametrize("cuda, trt_missing, openvino, expected", [
    (True, None, True, "tensorrt"),
    (True, "no tensorrt package", True, "torch"),
    (False, "no CUDA device", True, "openvino"),
    (False, "no CUDA device", False, "onnxruntime"),
])
def test_choose_backend(cuda, trt_missing, openvino, expected):
    backend, why = registry.choose_backend(cuda, trt_missing, openvino)
    assert backend == expected and why
    if trt_missing and cuda:
        assert trt_missing in why


def test_auto_on_cpu_opens_onnxruntime_and_logs(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setattr(registry, "cuda_available", lambda: False)
    monkeypatch.setattr(registry, "tensorrt_missing_reason", lambda: "no CUDA device is visible")
    monkeypatch.setattr(registry, "openvino_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        eng = open_engine(tiny_bundle)
    eng.close()
    assert eng.backend == "onnxruntime"
    lines = [r.getMessage() for r in caplog.records if r.name == "engines.registry"]
    assert len(lines) == 1 and "auto -> onnxruntime" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_with_gpu_but_no_tensorrt_picks_torch(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setattr(registry, "cuda_available", lambda: True)
    monkeypatch.setattr(registry, "tensorrt_missing_reason", lambda: "tensorrt not installed")
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        with pytest.raises(BackendUnavailable, match="CUDA"):
            open_engine(tiny_bundle)  # picks torch on CUDA, which this machine refuses: no fallback
    assert any("auto -> torch" in r.getMessage() for r in caplog.records)


def test_buckets():
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)
    assert [bucket_for(b, batch_buckets(12)) for b in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(EngineInputError):
        bucket_for(13, batch_buckets(12))
