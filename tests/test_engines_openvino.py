"""OpenVINO backend specifics: explicit precision read back, INT8 layers, hints, auto precision, refusals.

The Engine contract itself is checked for openvino in tests/test_engines_conformance.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from engines import BackendUnavailable, open_engine, registry
from engines import cpuinfo as cpuinfo_module
from engines.cpuinfo import CpuInfo, bf16_isa, read_cpuinfo

pytest.importorskip("openvino", reason="openvino is not installed (pip install edge-inspect[onnx])")

from engines.openvino_ import check_runtime, compile_config  # noqa: E402  (needs no openvino, but tests it)

HERE = read_cpuinfo()
HAS_BF16 = bf16_isa(HERE.flags) is not None


def _tiles(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)


def _open(bundle, **kw):
    return open_engine(bundle, backend="openvino", streams=kw.pop("streams", 1), max_batch=4, threads=1, **kw)


def test_compile_config_sets_precision_hint_threads_and_streams(tmp_path):
    assert compile_config("fp32", "latency", 2, 2, None) == {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2,
        "NUM_STREAMS": 1}
    assert compile_config("bf16", "throughput", 2, 4, None)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert compile_config("bf16", "throughput", 2, 4, None)["NUM_STREAMS"] == 2  # min(streams, threads)
    assert compile_config("int8", "latency", 1, 1, tmp_path)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config("int8", "latency", 1, 1, tmp_path)["CACHE_DIR"] == str(tmp_path / "openvino")
    with pytest.raises(BackendUnavailable, match="hint must be one of latency, throughput"):
        compile_config("fp32", "fastest", 1, 1, None)


@pytest.mark.parametrize("precision, read_back, layers, reason", [
    ("bf16", "f32", {"f32": 3}, "would run f32, not bf16.*AMX-BF16 or AVX512-BF16"),
    ("fp32", "bf16", {"bf16": 3}, "would run bf16 when asked for f32"),
    ("int8", "f32", {"f32": 3}, "no convolution of the INT8 graph runs in u8/i8"),
])
def test_check_runtime_refuses_what_it_would_not_run(precision, read_back, layers, reason):
    with pytest.raises(BackendUnavailable, match=reason):
        check_runtime(precision, read_back, layers, "test CPU")


def test_check_runtime_accepts_what_was_asked():
    """Pure check: returns None (no BackendUnavailable) when the runtime runs what was asked."""
    assert check_runtime("bf16", "bf16", {"bf16": 2}, "cpu") is None
    assert check_runtime("fp32", "f32", {"f32": 2}, "cpu") is None
    assert check_runtime("int8", "f32", {"u8": 2, "f32": 1}, "cpu") is None


def test_fp32_reads_back_f32_and_matches_onnxruntime(tiny_bundle):
    ov, ort = _open(tiny_bundle), open_engine(tiny_bundle, backend="onnxruntime", threads=1, max_batch=4)
    try:
        assert ov.precision == "fp32" and ov.runtime["inference_precision"] == "f32"
        assert (ov.runtime["threads"], ov.runtime["num_streams"], ov.runtime["hint"]) == (1, 1, "latency")
        assert set(ov.runtime["layers"]) == {"f32"}
        tiles = _tiles(4, seed=3)
        np.testing.assert_allclose(ov.infer(tiles), ort.infer(tiles), rtol=1e-4, atol=1e-5)
    finally:
        ov.close()
        ort.close()


def test_int8_runs_quantised_convolutions(tiny_bundle_int8):
    engine = _open(tiny_bundle_int8, precision="int8")
    try:
        assert engine.precision == "int8" and engine.runtime["model"] == "model.int8.onnx"
        assert engine.runtime["inference_precision"] == "f32"  # the layers left in floating point
        assert engine.runtime["layers"].get("u8", 0) + engine.runtime["layers"].get("i8", 0) >= 1
    finally:
        engine.close()


def test_int8_without_int8_graph_is_refused(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="carries no int8 model.*edge-engines quantize"):
        _open(tiny_bundle, precision="int8")


@pytest.mark.skipif(HAS_BF16, reason=f"this CPU computes BF16 natively ({HERE.summary()})")
def test_bf16_on_a_cpu_without_bf16_is_refused_not_downgraded(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="not bf16.*AMX-BF16 or AVX512-BF16"):
        _open(tiny_bundle, precision="bf16")


@pytest.mark.skipif(not HAS_BF16, reason=f"needs AMX-BF16 or AVX512-BF16; this CPU: {HERE.summary()}")
def test_bf16_reads_back_bf16(tiny_bundle):
    engine = _open(tiny_bundle, precision="bf16")
    try:
        assert engine.precision == "bf16" and engine.runtime["inference_precision"] == "bf16"
    finally:
        engine.close()


@pytest.fixture
def verified_int8(tiny_bundle_int8, tmp_path):
    """The INT8 tiny bundle with a passed guard recorded (benchmarks/precision_guard.record_guard)."""
    import shutil

    from benchmarks.precision_guard import record_guard

    copy = tmp_path / "verified"
    shutil.copytree(tiny_bundle_int8, copy)
    row = {"spec": "openvino:int8", "spearman": 0.999, "auroc_fp32": 1.0, "auroc_delta": 0.0, "flips": 0,
           "images": 20, "ok": True}
    assert record_guard(copy, [row], "synthetic", "test CPU")["ok"] is True
    return copy


@pytest.mark.parametrize("flags, bundle_fixture, expected, because", [
    (frozenset({"avx2"}), "verified_int8", "int8", "guard-checked"),
    (frozenset({"avx2"}), "tiny_bundle_int8", "fp32", "has not passed the accuracy guard"),
    (frozenset({"avx2"}), "tiny_bundle", "fp32", "no INT8 model"),
    (frozenset({"sse4_2"}), "verified_int8", "fp32", "no INT8 dot products"),
])
def test_auto_precision_follows_isa_and_bundle(flags, bundle_fixture, expected, because, request, monkeypatch,
                                               caplog):
    monkeypatch.setattr(cpuinfo_module, "read_cpuinfo", lambda: CpuInfo("fake CPU", flags))
    bundle = request.getfixturevalue(bundle_fixture)
    with caplog.at_level(logging.INFO, logger="engines.openvino_"):
        engine = _open(bundle, precision="auto")
    engine.close()
    assert engine.precision == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "engines.openvino_"]
    assert len(lines) == 1 and f"auto -> {expected}" in lines[0] and because in lines[0]


def test_throughput_hint_runs_slots_side_by_side(tiny_bundle):
    engine = open_engine(tiny_bundle, backend="openvino", streams=2, max_batch=4, threads=2,
                         hint="throughput")
    try:
        assert engine.runtime["hint"] == "throughput" and engine.runtime["num_streams"] == 2
        batches = [_tiles(2, seed=s) for s in range(4)]
        handles = [engine.submit(b, slot=i % 2) for i, b in enumerate(batches)]
        for tiles, handle in zip(batches, handles, strict=True):
            np.testing.assert_allclose(handle.result(), engine.infer(tiles), rtol=1e-6, atol=1e-7)
    finally:
        engine.close()


@pytest.mark.parametrize("kwargs, reason", [
    (dict(device="cuda:0"), "cpu only"),
    (dict(cuda_graphs=False), "no options"),
    (dict(hint="fastest"), "hint must be one of"),
    (dict(precision="fp16"), "not 'fp16'"),
])
def test_refusals(tiny_bundle, kwargs, reason):
    with pytest.raises(BackendUnavailable, match=reason):
        _open(tiny_bundle, **kwargs)


def test_auto_backend_on_cpu_picks_openvino(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setattr(registry, "cuda_available", lambda: False)
    monkeypatch.setattr(registry, "tensorrt_missing_reason", lambda: "no CUDA device is visible")
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        engine = open_engine(tiny_bundle, threads=1, max_batch=2)
    engine.close()
    assert (engine.backend, engine.precision) == ("openvino", "fp32")
    assert any("auto -> openvino" in r.getMessage() for r in caplog.records)


def test_cache_dir_is_used(tiny_bundle, tmp_path):
    engine = _open(tiny_bundle, cache_dir=Path(tmp_path))
    engine.close()
    assert any((tmp_path / "openvino").iterdir())
