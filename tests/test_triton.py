"""backend: triton against a REAL Triton Inference Server (the CPU tritonserver of nvidia-pytriton 0.7.0, in
its own virtualenv: engines/triton_local.py), never a mock.

The server loads a repository written by ``triton-repo --format python`` (our ONNX Runtime engine inside
Triton's Python backend; the bundled server has no onnxruntime backend, which the last test shows). Checked:
the repository loads as written, engine parity with the local ONNX Runtime engine over gRPC and HTTP, the
engine contract, mismatches refused, bounded failure on a dead or frozen server and recovery, TLS, and the
daemon answering every frame through the server, also while the server is killed and started again.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_helpers import DaemonProcess, daemon_config, handshake
from triton_helpers import self_signed_tls, server_env_or_skip, start_server, wait_for

from edge_daemon.client import FramePublisher, VerdictSubscriber
from edge_daemon.transport import free_tcp_port
from engines import EngineError, EngineInputError, open_engine
from engines.bundle import read_bundle
from engines.triton_ import ModelMismatch
from engines.triton_local import TritonServer
from engines.triton_repo import write_repository
from inspection.pipeline import InspectConfig, inspect_frame

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")

MODEL = "tiny"
MAX_BATCH = 8


def _tiles(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def server_env():
    return server_env_or_skip()


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-repo")
    write_repository(tiny_bundle, out, name=MODEL, fmt="python", max_batch=MAX_BATCH, threads=1)
    return out


@pytest.fixture(scope="module")
def server(server_env, repo, tmp_path_factory):
    srv = start_server(server_env, repo, tmp_path_factory.mktemp("triton-log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tiny_bundle):
    engine = open_engine(tiny_bundle, backend="onnxruntime", streams=1, max_batch=MAX_BATCH, threads=1)
    yield engine
    engine.close()


def _remote(bundle, server, protocol="grpc", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return open_engine(bundle, backend="triton", streams=2, max_batch=MAX_BATCH, url=url, model=MODEL,
                       protocol=protocol, **options)


def test_generated_repository_loads_as_written(server, tiny_bundle):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_model_ready(MODEL)
        config = client.get_model_config(MODEL, as_json=True)["config"]
    finally:
        client.close()
    assert config["backend"] == "python" and config["max_batch_size"] == MAX_BATCH
    assert [int(d) for d in config["input"][0]["dims"]] == [32, 32, 1]
    assert [int(d) for d in config["output"][0]["dims"]] == [1, 8, 8]
    assert config["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]
    assert config["parameters"]["edge_inspect_model_id"]["string_value"] == read_bundle(tiny_bundle).model_id


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_parity_with_the_local_engine(server, tiny_bundle, local, protocol):
    engine = _remote(tiny_bundle, server, protocol)
    try:
        assert (engine.backend, engine.precision, engine.input_shape, engine.map_shape) == (
            "triton", "fp32", (32, 32, 1), (8, 8))
        engine.warmup()
        for batch in (1, 3, MAX_BATCH):
            tiles = _tiles(batch, seed=batch)
            np.testing.assert_allclose(engine.infer(tiles), local.infer(tiles), rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def test_engine_contract_slots_in_flight_and_bad_input(server, tiny_bundle, local):
    engine = _remote(tiny_bundle, server)
    try:
        batches = [_tiles(4, seed=s) for s in range(6)]
        handles = [engine.submit(tiles, slot=i % 2) for i, tiles in enumerate(batches[:2])]
        outs = [h.result() for h in handles]
        for tiles in batches[2:]:  # the caller's buffer may change at once after submit
            handle = engine.submit(tiles, slot=1)
            tiles[:] = 0
            outs.append(handle.result())
        for tiles, out in zip(batches[:2], outs[:2], strict=True):
            np.testing.assert_allclose(out, local.infer(tiles), rtol=1e-5, atol=1e-6)
        assert all(o.flags.writeable and o.flags.owndata and o.dtype == np.float32 for o in outs)
        assert not np.shares_memory(outs[0], outs[1])
        with pytest.raises(EngineInputError, match="uint8"):
            engine.infer(np.zeros((1, 32, 32, 1), np.float32))
        with pytest.raises(EngineInputError, match="outside 1..max_batch"):
            engine.infer(_tiles(MAX_BATCH + 1))
        with pytest.raises(EngineInputError, match="slot 2"):
            engine.submit(_tiles(1), slot=2)
    finally:
        engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(_tiles(1))


def test_a_model_that_does_not_fit_the_bundle_is_refused_at_open(server, tiny_bundle, tmp_path):
    from conftest import make_tiny_bundle

    with pytest.raises(ModelMismatch, match="max_batch_size is 8"):
        open_engine(tiny_bundle, backend="triton", max_batch=16, url=server.grpc_url, model=MODEL)
    other = tmp_path / "b64"
    make_tiny_bundle(other, tile=64)
    with pytest.raises(ModelMismatch, match=r"needs TYPE_UINT8 \[64, 64, 1\]"):
        open_engine(other, backend="triton", max_batch=8, url=server.grpc_url, model=MODEL)
    with pytest.raises(ModelMismatch, match="runs fp32, fp16 was asked for"):
        open_engine(tiny_bundle, backend="triton", max_batch=8, precision="fp16", url=server.grpc_url,
                    model=MODEL)


def test_unreachable_server_fails_batches_fast_and_never_blocks_open(tiny_bundle, caplog):
    url = f"127.0.0.1:{free_tcp_port()}"  # nothing listens there
    start = time.monotonic()
    engine = open_engine(tiny_bundle, backend="triton", max_batch=8, url=url, model=MODEL, timeout_s=2,
                         connect_timeout_s=2)
    try:
        assert "does not serve now" in caplog.text
        engine.warmup()  # skipped with a warning, not raised: the pool may come up later
        with pytest.raises(EngineError, match=f"triton grpc://{url} model 'tiny': .*UNAVAILABLE"):
            engine.infer(_tiles(2))
    finally:
        engine.close()
    assert time.monotonic() - start < 10


def test_unknown_model_is_an_error_per_batch(server, tiny_bundle):
    engine = open_engine(tiny_bundle, backend="triton", max_batch=8, url=server.grpc_url, model="nope")
    try:
        with pytest.raises(EngineError, match="nope"):
            engine.infer(_tiles(1))
    finally:
        engine.close()


@pytest.mark.parametrize("protocol, timed_out", [("grpc", "DEADLINE_EXCEEDED"), ("http", "timed out")])
def test_frozen_server_times_out_then_the_engine_recovers(server, tiny_bundle, local, protocol, timed_out):
    """SIGSTOP freezes the real server: the batch fails after timeout_s instead of hanging; after SIGCONT the
    same engine serves again."""
    engine = _remote(tiny_bundle, server, protocol, timeout_s=1.0, connect_timeout_s=1.0)
    try:
        engine.infer(_tiles(2))
        server.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(EngineError, match=timed_out):
                engine.infer(_tiles(2))
            assert time.monotonic() - start < 5
        finally:
            server.proc.send_signal(signal.SIGCONT)
        tiles = _tiles(3, seed=9)
        out = wait_for(lambda: _try(engine, tiles), 20.0, "the engine answering again")
        np.testing.assert_allclose(out, local.infer(tiles), rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def _try(engine, tiles):
    try:
        return engine.infer(tiles)
    except EngineError:
        return None


@pytest.mark.slow
def test_grpc_tls(server_env, repo, tiny_bundle, local, tmp_path):
    tls = self_signed_tls(tmp_path)
    srv = start_server(server_env, repo, tmp_path / "server.log", tls=tls)
    try:
        engine = open_engine(tiny_bundle, backend="triton", max_batch=8, url=srv.grpc_url, model=MODEL,
                             tls=True, tls_ca=tls["cert"])
        try:
            assert engine.target.where.startswith("triton grpcs://")
            tiles = _tiles(5, seed=3)
            np.testing.assert_allclose(engine.infer(tiles), local.infer(tiles), rtol=1e-5, atol=1e-6)
        finally:
            engine.close()
        plain = open_engine(tiny_bundle, backend="triton", max_batch=8, url=srv.grpc_url, model=MODEL,
                            timeout_s=2, connect_timeout_s=2)
        try:
            with pytest.raises(EngineError, match="UNAVAILABLE"):
                plain.infer(_tiles(1))
        finally:
            plain.close()
    finally:
        srv.stop()


# ---- the daemon through the server ------------------------------------------------------------------------


def _triton_daemon(tmp_path, bundle, srv, timeout_s=2.0):
    engine = {"bundle": str(bundle), "backend": "triton", "max_batch": MAX_BATCH, "max_delay_us": 1000,
              "streams": 2, "triton": {"url": srv.grpc_url, "model": MODEL, "timeout_s": timeout_s,
                                       "connect_timeout_s": timeout_s}}
    path, data = daemon_config(tmp_path, bundle, engine=engine)
    proc = DaemonProcess(path, tmp_path / "daemon.log", instance=data["instance"])
    proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=60)
    return proc, data


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 96), dtype=np.uint8) for _ in range(n)]


def _records(sub, wanted: set, timeout_s: float) -> dict:
    """(camera, frame id) -> record for the ``wanted`` frames (late records of other frames are skipped)."""
    out, deadline = {}, time.monotonic() + timeout_s
    while len(out) < len(wanted) and time.monotonic() < deadline:
        item = sub.recv(0.1)
        key = (getattr(item, "camera_id", None), getattr(item, "frame_id", None))
        if key in wanted and item.kind in ("verdict", "error"):
            assert key not in out, f"frame {key} answered twice"
            out[key] = item
    return out


def test_daemon_answers_every_frame_through_triton(server, tiny_bundle, local, tmp_path):
    proc, data = _triton_daemon(tmp_path, tiny_bundle, server)
    frames = _frames(12)
    try:
        with VerdictSubscriber(data["endpoints"]["output"]) as sub, \
                FramePublisher(data["endpoints"]["ingest"], "cam1") as cam:
            handshake(cam, sub, frames[0])
            ids = {cam.send(frame, frame_id=1000 + i): frame for i, frame in enumerate(frames)}
            got = _records(sub, {("cam1", fid) for fid in ids}, 30.0)
        assert set(got) == {("cam1", fid) for fid in ids}
        config = InspectConfig.from_mapping(data["inspection"], "inspection")
        for (_, fid), record in got.items():
            assert record.kind == "verdict", record
            expected = inspect_frame(local, ids[fid], config)  # parity: the same frame on the local engine
            assert record.verdict == expected.verdict
            assert record.score == pytest.approx(expected.score, rel=1e-5, abs=1e-6)
        assert proc.terminate(timeout_s=30) == 0, proc.logs()
        assert "backend=triton" in proc.logs()
    finally:
        proc.stop()


@pytest.mark.slow
def test_daemon_survives_a_pool_outage(server_env, repo, tiny_bundle, tmp_path):
    """The daemon starts while the server is down, then the server comes up, is SIGKILLed mid-stream and is
    started again on the same ports: while it is down frames get error records naming the server, none is lost
    or answered twice, and verdicts come back each time it is up."""
    srv = TritonServer(server_env, repo, free_tcp_port(), free_tcp_port(), tmp_path / "server.log")
    proc = None
    try:
        proc, data = _triton_daemon(tmp_path, tiny_bundle, srv, timeout_s=1.0)
        frames = _frames(3, seed=1)
        with VerdictSubscriber(data["endpoints"]["output"]) as sub, \
                FramePublisher(data["endpoints"]["ingest"], "cam1") as cam:
            handshake(cam, sub, frames[0])
            phases = {}
            for phase, base in (("down at start", 1000), ("up", 2000), ("killed", 3000), ("back", 4000)):
                if phase in ("up", "back"):
                    srv.start().wait_ready(90)
                    _wait_verdict(cam, sub, frames[0])
                if phase == "killed":
                    srv.kill()
                sent = [cam.send(frames[i % 3], frame_id=base + i) for i in range(6)]
                got = _records(sub, {("cam1", fid) for fid in sent}, 30.0)
                assert set(got) == {("cam1", fid) for fid in sent}, phase
                phases[phase] = [r.kind if r.kind == "verdict" else r.reason for r in got.values()]
        assert phases["up"] == phases["back"] == ["verdict"] * 6, phases
        for phase in ("down at start", "killed"):
            assert all(r.startswith(f"EngineError: triton grpc://{srv.grpc_url} model 'tiny': ")
                       for r in phases[phase]), phases[phase]
        assert proc.terminate(timeout_s=30) == 0, proc.logs()
        assert "does not serve now" in proc.logs()
    finally:
        if proc is not None:
            proc.stop()
        srv.stop()


_PROBES = itertools.count(9_000_000)


def _wait_verdict(cam, sub, frame, timeout_s: float = 30.0) -> None:
    """Probe frames until one gets a verdict (the engine reconnected)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = _records(sub, {("cam1", cam.send(frame, frame_id=next(_PROBES)))}, 2.0)
        if any(r.kind == "verdict" for r in records.values()):
            return
    raise TimeoutError("no verdict after the server came back")


@pytest.mark.slow
def test_cli_triton_serve_is_the_server(server_env, repo, tiny_bundle, local, tmp_path):
    """The documented command: `edge-engines triton-serve` execs the server (SIGTERM goes straight to it)."""
    grpc_port, http_port = free_tcp_port(), free_tcp_port()
    cmd = [sys.executable, "-m", "engines.cli", "triton-serve", "--repo", str(repo), "--server-dir",
           str(server_env.root), "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probe = TritonServer(server_env, repo, grpc_port, http_port, tmp_path / "unused.log")
        wait_for(lambda: True if probe.ready() else (None if proc.poll() is None else False), 90.0,
                 "triton-serve ready")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        engine = open_engine(tiny_bundle, backend="triton", max_batch=MAX_BATCH, url=f"127.0.0.1:{grpc_port}",
                             model=MODEL)
        try:
            tiles = _tiles(4, seed=5)
            np.testing.assert_allclose(engine.infer(tiles), local.infer(tiles), rtol=1e-5, atol=1e-6)
        finally:
            engine.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_bundled_server_has_no_onnxruntime_backend(server_env, tiny_bundle, tmp_path):
    """Why the repositories served here use the python format: the onnx format does not load in this server
    (it loads in NVIDIA's full Triton server, whose image has the onnxruntime backend)."""
    pytest.importorskip("onnx")
    write_repository(tiny_bundle, tmp_path / "repo", name="tiny_onnx", fmt="onnx", kind="cpu")
    backends = sorted(p.name for p in server_env.backends.iterdir())
    if "onnxruntime" in backends:
        srv = start_server(server_env, tmp_path / "repo", tmp_path / "server.log")
        srv.stop()
        return
    srv = None
    with pytest.raises(EngineError, match="exited"):
        srv = start_server(server_env, tmp_path / "repo", tmp_path / "server.log", timeout_s=60)
    assert backends == ["python"]
    assert "unable to find backend library for backend 'onnxruntime'" in (tmp_path / "server.log").read_text()
    assert srv is None
