"""PyTorch CUDA backend.

First part, run everywhere: the CUDA bookkeeping that is ours (stream waits, record_stream and references on
torch inputs, precision flags, device placement, what close() frees before empty_cache), with the CUDA calls
faked (tests/cuda_fakes.py) and tensors on the CPU; FP16 runs on the CPU too, so the FP16 core with its FP32
map head is checked here on out-of-distribution tiles.
Second part, skipped without CUDA (reason given): the same on a GPU, FP16 vs FP32, CUDA graphs, streams.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from engines import BackendUnavailable, EngineError, open_engine
from engines.bundle import read_bundle
from engines.cuda_slots import fp32_math
from engines.torch_ import TorchEngine
from engines.torch_fp16 import map_head, mixed_precision
from inspection import batcher as batcher_module
from inspection.batcher import TileBatcher
from inspection.pipeline import InspectConfig, inspect_frame
from tests.cuda_fakes import FakeCudaOps
from tests.fp16_stress import good_tiles, ood_tiles, stress_bundle

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
FP16_RTOL, FP16_ATOL = 1e-2, 2e-3


def _tiles(batch, seed=0, shape=(32, 32, 1)):
    return np.random.default_rng(seed).integers(0, 256, (batch, *shape), dtype=np.uint8)


def _fake_engine(bundle, ops=None, device="cuda:0", precision="fp32", streams=2, max_batch=8):
    meta = read_bundle(bundle)
    return TorchEngine(bundle / meta.files["torch"]["path"], meta, device=device, precision=precision,
                       streams=streams, max_batch=max_batch, cuda_graphs=False, ops=ops or FakeCudaOps())


@pytest.fixture
def cpu_engine(tiny_bundle):
    engine = open_engine(tiny_bundle, backend="torch", device="cpu", max_batch=8)
    yield engine
    engine.close()


# --- bookkeeping with faked CUDA calls (runs everywhere) ---------------------------------------------------

def test_fake_cuda_engine_computes_what_the_cpu_engine_does(tiny_bundle, cpu_engine):
    engine = _fake_engine(tiny_bundle)
    tiles = _tiles(5)
    np.testing.assert_allclose(engine.infer(tiles), cpu_engine.infer(tiles), rtol=1e-6, atol=1e-7)
    handles = [engine.submit(_tiles(b, seed=b), slot=b % 2) for b in (1, 3, 8)]
    for b, handle in zip((1, 3, 8), handles, strict=True):
        np.testing.assert_allclose(handle.result(), cpu_engine.infer(_tiles(b, seed=b)), rtol=1e-6, atol=1e-7)
    engine.close()


def test_slot_streams_wait_for_the_engine_setup(tiny_bundle):
    ops = FakeCudaOps()
    engine = _fake_engine(tiny_bundle, ops, streams=3)
    streams = [entry[1] for entry in ops.calls("stream")]
    assert len(streams) == 3
    waits = {entry[1]: entry[2] for entry in ops.calls("wait_stream")}
    assert waits == {name: "current@cuda:0" for name in streams}  # zero-fill and weight conversion first
    engine.close()


def test_torch_tiles_are_recorded_on_the_slot_stream_and_held_until_the_event(tiny_bundle, cpu_engine):
    ops = FakeCudaOps()
    engine = _fake_engine(tiny_bundle, ops)
    parts = [torch.from_numpy(_tiles(2, seed=1)), torch.from_numpy(_tiles(3, seed=2))]
    tiles = torch.cat(parts)  # a temporary the caller drops at once, as the batcher does
    address, alive = tiles.data_ptr(), weakref.ref(tiles)
    ops.log.clear()
    handle = engine.submit(tiles, slot=1)
    del tiles
    gc.collect()
    assert alive() is not None and handle.keeps_input
    slot_stream = engine._slots[1].stream.name
    assert ("wait_stream", slot_stream, "current@cuda:0") in ops.log  # after whatever wrote the tiles
    assert ("record_stream", address, slot_stream) in ops.log
    assert ops.log.index(("wait_stream", slot_stream, "current@cuda:0")) < ops.log.index(
        ("record_stream", address, slot_stream))
    out = handle.result()
    gc.collect()
    assert alive() is None and not handle.keeps_input
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    expected = cpu_engine.infer(torch.cat(parts).numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    engine.close()


class _SlowEngine:
    """Engine stub whose batches stay in flight until released; remembers what it was given."""

    def __init__(self, inner):
        self.inner, self.meta, self.max_batch, self.streams = inner, inner.meta, 4, 1
        self.input_shape, self.map_shape, self.device = inner.input_shape, inner.map_shape, "cuda:0"
        self.given, self.released = [], False

    def submit(self, tiles, slot=0):
        self.given.append(weakref.ref(tiles))
        engine, maps = self, self.inner.infer(tiles.numpy())

        class Handle:
            def done(self):
                return engine.released

            def result(self):
                return torch.from_numpy(maps)

        return Handle()


def test_batcher_holds_the_concatenated_batch_until_collected(tiny_bundle, cpu_engine, monkeypatch):
    monkeypatch.setattr(batcher_module, "_device_of", lambda engine: "cpu")  # torch tiles on the CPU
    engine = _SlowEngine(cpu_engine)
    batcher = TileBatcher(engine, max_batch=4, max_delay_us=0)
    config = InspectConfig(tile_overlap=8)
    for i in range(2):  # two 32x48 frames of 2 tiles each: one batch = torch.cat of two frames' tiles
        batcher.add(i, "cam", np.full((32, 48), 40 * i, np.uint8), config)
    assert batcher.poll(0) == []
    gc.collect()
    assert engine.given and engine.given[0]() is not None  # the temporary lives while the batch is in flight
    engine.released = True
    results = batcher.drain(5.0)
    gc.collect()
    assert [ticket for ticket, _ in results] == [0, 1] and engine.given[0]() is None


def test_fp32_means_ieee_and_tf32_is_named(tiny_bundle):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, core):
            super().__init__()
            self.core = core

        def forward(self, x):
            seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return self.core(x)

    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    for precision, mode in (("fp32", "ieee"), ("tf32", "tf32")):
        engine = _fake_engine(tiny_bundle, precision=precision)
        engine._core = Spy(engine._core)
        engine.infer(_tiles(2))
        assert seen[-1] == (mode, mode) and engine.precision == precision
        engine.close()
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with fp32_math("fp32"):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    with pytest.raises(BackendUnavailable, match="not available on cpu"):
        open_engine(tiny_bundle, backend="torch", device="cpu", precision="tf32")


def test_built_on_its_own_device(tiny_bundle):
    ops = FakeCudaOps()
    engine = _fake_engine(tiny_bundle, ops, device="cuda:1")
    assert ops.calls("use_device")[0] == ("use_device", "cuda:1")
    assert {entry[2] for entry in ops.calls("stream")} == {"cuda:1"}  # streams made with cuda:1 current
    engine.close()


def test_close_frees_everything_before_empty_cache(tiny_bundle):
    ops = FakeCudaOps()
    engine = _fake_engine(tiny_bundle, ops)
    handle = engine.submit(torch.from_numpy(_tiles(2)), slot=0)
    watched = {"core": weakref.ref(engine._core), "pre": weakref.ref(engine._pre),
               "dev_in": weakref.ref(engine._slots[0].dev_in),
               "host_out": weakref.ref(engine._slots[1].host_out),
               "last result": weakref.ref(handle.result())}
    del handle
    alive_at_empty_cache = {}
    ops.on_empty_cache = lambda _ops: alive_at_empty_cache.update(
        {name: ref() is not None for name, ref in watched.items()})
    engine.close()
    assert alive_at_empty_cache == dict.fromkeys(watched, False)
    with pytest.raises(EngineError, match="closed"):
        engine.infer(_tiles(1))
    with pytest.raises(EngineError, match="closed"):
        engine.warmup()


# --- FP16 core: convolutions FP16, map head FP32 (CPU FP16 here) -------------------------------------------

@pytest.fixture(scope="module")
def stress_bundles(tmp_path_factory):
    return {name: stress_bundle(name, tmp_path_factory.mktemp(name))
            for name in ("student-teacher", "reconstruction")}


def test_fp16_core_keeps_the_map_head_fp32(stress_bundles):
    from engines.torch_ import load_core

    bundle = stress_bundles["student-teacher"]
    core = mixed_precision(load_core(bundle / "core.pt2"))
    head = {node.name for node in map_head(core.graph)}
    assert {"pow", "mean", "div"} <= {name.rstrip("_0123456789") for name in head}
    params = dict(core.named_parameters())
    buffers = dict(core.named_buffers())
    assert all(p.dtype == torch.float16 for name, p in params.items() if "weight" in name)
    assert buffers["std"].dtype == torch.float32  # read by the head: a 1e-6 std is not rounded to FP16


@pytest.mark.parametrize("name", ["student-teacher", "reconstruction"])
def test_fp16_engine_ood_tiles_finite_close_and_fail(stress_bundles, name, monkeypatch):
    from engines.torch_ import load_core
    from inspection import pipeline

    monkeypatch.setattr(pipeline, "_device_of", lambda engine: "cpu")  # the fake's "device" tensors are CPU

    bundle = stress_bundles[name]
    tiles = np.concatenate([good_tiles(2), ood_tiles()])
    full = _fake_engine(bundle, precision="fp32", max_batch=8)
    half = _fake_engine(bundle, precision="fp16", max_batch=8)
    ref, out = full.infer(tiles), half.infer(tiles)
    assert np.isfinite(ref).all() and np.isfinite(out).all()
    scale = np.abs(ref).reshape(len(ref), -1).max(1)[:, None, None, None]
    np.testing.assert_allclose(out, ref, rtol=FP16_RTOL, atol=FP16_ATOL * scale.max())
    with torch.inference_mode():  # the premise: the same core wholly in FP16 overflows on these tiles
        naive = load_core(bundle / "core.pt2").half()(half._pre(torch.from_numpy(tiles)).half())
    naive = naive[0] if isinstance(naive, tuple) else naive
    assert not torch.isfinite(naive).all()
    config = InspectConfig(tile_overlap=8)
    for tile in ood_tiles():  # a frame of one tile each
        result = inspect_frame(half, tile, config)
        assert result.verdict == "FAIL" and np.isfinite(result.score), result.reason
    assert inspect_frame(half, good_tiles(1, seed=9)[0], config).verdict == "PASS"
    full.close()
    half.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind, options, maps", [
    ("efficientad", {"size": "s", "tile": 64}, 2),
    ("efficientad", {"size": "m", "tile": 64}, 2),
    ("dfr", {"size": "s", "latent": 16, "pretrained": False}, 1)])
def test_real_cores_rewrite_to_fp16_with_an_fp32_head(tmp_path, kind, options, maps):
    """EfficientAD-S/M and DFR (untrained) exported, rewritten, run in FP16 on the CPU: close to FP32."""
    from engines.bundle import BundleMeta, InputSpec, MapSpec
    from engines.graph import Preprocess, export_bundle
    from engines.torch_ import load_core
    from trainer.models import create_model

    options = dict(options)
    core = create_model(kind, options.pop("size"), **options).eval()
    spec = InputSpec(height=64, width=64, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    meta = BundleMeta(kind=kind, size="s", input=spec, image_threshold=0.5, pixel_threshold=0.5,
                      map=MapSpec(height=16, width=16, stride=4, q_a=(0.0,) * maps, q_b=(1.0,) * maps,
                                  weights=(1.0 / maps,) * maps))
    export_bundle(core, meta, tmp_path)
    x = Preprocess(spec)(torch.from_numpy(np.concatenate([good_tiles(2, size=64), ood_tiles(size=64)])))
    mixed = mixed_precision(load_core(tmp_path / "core.pt2"))
    with torch.inference_mode():
        full, half = load_core(tmp_path / "core.pt2")(x), mixed(x)
    full, half = (t[0] if isinstance(t, tuple) else t for t in (full, half))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - full).abs().max() / full.abs().max()) < 1e-2
    assert {"pow", "sum" if kind == "dfr" else "mean"} <= {n.name.rstrip("_0123456789")
                                                          for n in map_head(mixed.graph)}


# --- on a GPU (skipped without CUDA) -----------------------------------------------------------------------

@pytest.fixture
def engines(tiny_bundle):
    opened = {p: open_engine(tiny_bundle, backend="torch", device="cuda", precision=p, max_batch=16)
              for p in ("fp32", "fp16")}
    yield opened
    for engine in opened.values():
        engine.close()


@CUDA
@pytest.mark.gpu_only
def test_fp16_close_to_fp32_and_same_verdicts(engines):
    tiles = _tiles(16)
    full, half = engines["fp32"].infer(tiles), engines["fp16"].infer(tiles)
    np.testing.assert_allclose(half, full, rtol=FP16_RTOL, atol=FP16_ATOL)
    scores_full, scores_half = full.reshape(16, -1).max(1), half.reshape(16, -1).max(1)
    threshold = float(np.median(scores_full))
    clear = np.abs(scores_full - threshold) > 1e-2 * abs(threshold)
    np.testing.assert_array_equal((scores_half > threshold)[clear], (scores_full > threshold)[clear])


@CUDA
@pytest.mark.gpu_only
def test_cuda_graphs_on_and_off_agree(tiny_bundle):
    on = open_engine(tiny_bundle, backend="torch", device="cuda", precision="fp16", max_batch=8)
    off = open_engine(tiny_bundle, backend="torch", device="cuda", precision="fp16", max_batch=8,
                      cuda_graphs=False)
    on.warmup()
    for batch in (1, 3, 8):  # 3 is padded up to bucket 4
        tiles = _tiles(batch, seed=batch)
        np.testing.assert_allclose(on.infer(tiles), off.infer(tiles), rtol=1e-3, atol=1e-5)
    on.close()
    off.close()


@CUDA
@pytest.mark.gpu_only
def test_streams_in_flight_and_torch_io(engines):
    engine = engines["fp16"]
    batches = [_tiles(b, seed=b) for b in (1, 5, 16, 2, 7, 9)]
    handles = [engine.submit(t, slot=i % engine.streams) for i, t in enumerate(batches)]
    for tiles, handle in zip(batches, handles, strict=True):
        np.testing.assert_allclose(handle.result(), engine.infer(tiles), rtol=1e-3, atol=1e-5)
    out = engine.infer(torch.from_numpy(batches[2]).cuda())
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (16, 1, 8, 8)
    np.testing.assert_allclose(out.cpu().numpy(), engine.infer(batches[2]), rtol=1e-3, atol=1e-5)


@CUDA
@pytest.mark.gpu_only
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_tiles_freed_at_once_on_both_slots(tiny_bundle, precision):
    """submit() of temporaries dropped at once, two slots in flight, allocator pressure: exact values."""
    engine = open_engine(tiny_bundle, backend="torch", device="cuda", precision=precision, max_batch=16)
    batches = [_tiles(b, seed=10 + b) for b in (16, 5, 16, 3, 9, 16)]
    expected = [engine.infer(t) for t in batches]
    handles = []
    for i, tiles in enumerate(batches):
        handles.append(engine.submit(torch.cat([torch.from_numpy(t).cuda() for t in np.split(tiles, [1])]),
                                     slot=i % 2))
        torch.empty_like(torch.from_numpy(tiles).cuda()).fill_(255)  # reuses a freed block at once if allowed
    for handle, want in zip(handles, expected, strict=True):
        np.testing.assert_array_equal(handle.result().cpu().numpy(), want)
    engine.close()


@CUDA
@pytest.mark.gpu_only
@pytest.mark.parametrize("name", ["student-teacher", "reconstruction"])
def test_gpu_fp16_ood_tiles_finite_and_fail(stress_bundles, name):
    bundle = stress_bundles[name]
    tiles = np.concatenate([good_tiles(2), ood_tiles()])
    full = open_engine(bundle, backend="torch", device="cuda", precision="fp32", max_batch=8)
    half = open_engine(bundle, backend="torch", device="cuda", precision="fp16", max_batch=8)
    ref, out = full.infer(tiles), half.infer(tiles)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=FP16_RTOL, atol=FP16_ATOL * float(np.abs(ref).max()))
    for tile in ood_tiles():
        result = inspect_frame(half, np.tile(tile, (2, 2, 1)), InspectConfig(tile_overlap=8))
        assert result.verdict == "FAIL" and np.isfinite(result.score)
    full.close()
    half.close()
