"""PyTorch CUDA backend: FP16 vs FP32, verdicts, CUDA graphs on/off, streams. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import open_engine

pytestmark = [pytest.mark.gpu_only,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]

FP16_RTOL, FP16_ATOL = 1e-2, 2e-3


def _tiles(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)


@pytest.fixture
def engines(tiny_bundle):
    opened = {p: open_engine(tiny_bundle, backend="torch", device="cuda", precision=p, max_batch=16)
              for p in ("fp32", "fp16")}
    yield opened
    for engine in opened.values():
        engine.close()


def test_fp16_close_to_fp32_and_same_verdicts(engines):
    tiles = _tiles(16)
    full, half = engines["fp32"].infer(tiles), engines["fp16"].infer(tiles)
    np.testing.assert_allclose(half, full, rtol=FP16_RTOL, atol=FP16_ATOL)
    scores_full, scores_half = full.reshape(16, -1).max(1), half.reshape(16, -1).max(1)
    threshold = float(np.median(scores_full))
    clear = np.abs(scores_full - threshold) > 1e-2 * abs(threshold)
    np.testing.assert_array_equal((scores_half > threshold)[clear], (scores_full > threshold)[clear])


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


def test_streams_in_flight_and_torch_io(engines):
    engine = engines["fp16"]
    batches = [_tiles(b, seed=b) for b in (1, 5, 16, 2, 7, 9)]
    handles = [engine.submit(t, slot=i % engine.streams) for i, t in enumerate(batches)]
    for tiles, handle in zip(batches, handles, strict=True):
        np.testing.assert_allclose(handle.result(), engine.infer(tiles), rtol=1e-3, atol=1e-5)
    out = engine.infer(torch.from_numpy(batches[2]).cuda())
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (16, 1, 8, 8)
    np.testing.assert_allclose(out.cpu().numpy(), engine.infer(batches[2]), rtol=1e-3, atol=1e-5)
