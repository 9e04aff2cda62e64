"""Bad input never stops the daemon: every message gets exactly one record (an error with its reason, or a
verdict when a generated message happens to be valid) and a valid frame still gets a verdict afterwards.

Three levels: the ingest object in-process (hypothesis, many examples, fast), the real daemon as a
subprocess on loopback (hypothesis, fewer examples, one daemon for the module), and config fuzzing
(check-config / run exit 2 with the key named, never a traceback). Also: SUB ingest and imagezmq PUB/SUB,
and ``run --bundle`` overriding engine.bundle.
"""

from __future__ import annotations

import json
import shutil
import time

import cv2
import imagezmq
import msgpack
import numpy as np
import pytest
import yaml
import zmq
from daemon_helpers import (
    DaemonProcess,
    accounting,
    collect,
    daemon_config,
    handshake,
    stopped_fields,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_daemon.cli import main as daemon_cli
from edge_daemon.client import FramePublisher, VerdictSubscriber
from edge_daemon.config import ConfigError, DaemonConfig, config_from_mapping
from edge_daemon.frames import encoded_size
from edge_daemon.ingest import Ingest
from edge_daemon.protocol import RAW_ENCODINGS, pack
from edge_daemon.shm import SlotRing
from edge_daemon.transport import free_tcp_port, ipc_endpoint

pytest.importorskip("onnxruntime")

MAX_W = MAX_H = 256
MAX_PAYLOAD = MAX_W * MAX_H * 3
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
DIMS = st.one_of(st.integers(1, 300), st.sampled_from([0, -1, 2**31, 2**62]))


def _image(kind: str, h: int, w: int, channels: int, seed: int) -> bytes:
    shape = (h, w) if channels == 1 else (h, w, channels)
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg" if kind == "jpeg" else ".png", img)
    assert ok
    return buf.tobytes()


@st.composite
def payloads(draw, header: dict) -> bytes:
    enc = header.get("encoding") if isinstance(header.get("encoding"), str) else None
    kind = draw(st.sampled_from(["exact", "off", "empty", "random", "image", "truncated", "corrupt", "huge"]))
    seed = draw(st.integers(0, 2**16))
    if kind in ("exact", "off") and enc in RAW_ENCODINGS:
        dims = [header.get(k) for k in ("width", "height", "channels")]
        if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            n = dims[0] * dims[1] * dims[2] * (2 if enc == "mono16" else 1)
            if n <= 2 * MAX_PAYLOAD:
                n = n if kind == "exact" else max(0, n + draw(st.sampled_from([-1, 1, -7, 100])))
                return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    if kind == "empty":
        return b""
    if kind == "huge":
        return bytes(MAX_PAYLOAD + 1)
    if kind in ("image", "truncated", "corrupt"):
        fmt = enc if enc in ("jpeg", "png") else draw(st.sampled_from(["jpeg", "png"]))
        buf = bytearray(_image(fmt, draw(DIMS.filter(lambda d: 0 < d <= 300)), 40, 3, seed))
        if kind == "truncated":
            buf = buf[: draw(st.integers(0, len(buf) - 1))]
        elif kind == "corrupt":
            for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
                buf[pos] ^= 0xFF
        return bytes(buf)
    return draw(st.binary(max_size=512))


@st.composite
def headers(draw, camera: str = "fz") -> dict:
    enc = draw(st.sampled_from([*RAW_ENCODINGS, "jpeg", "png", "yuv422", "JPEG", ""]))
    header = {
        "v": 1,
        "camera_id": camera,
        "frame_id": draw(st.integers(0, 2**63 - 1)),
        "timestamp_ns": draw(st.integers(0, 2**63 - 1)),
        "encoding": enc,
    }
    if enc in RAW_ENCODINGS or draw(st.integers(0, 4)) == 0:
        header.update(width=draw(DIMS), height=draw(DIMS), channels=RAW_ENCODINGS.get(enc, (3,))[0])
    keys = st.sampled_from([*header, "extra", "v", "camera_id"])
    for key, action in draw(st.lists(st.tuples(keys, st.sampled_from(["drop", "junk"])), max_size=2)):
        if action == "drop":
            header.pop(key, None)
        else:
            header[key] = draw(JUNK)
    return header


@st.composite
def messages(draw, camera: str = "fz") -> list[bytes]:
    header = draw(headers(camera))
    payload = draw(payloads(header))
    head_kind = draw(st.sampled_from(["map"] * 6 + ["bytes", "not-a-map", "huge"]))
    if head_kind == "map":
        head = pack(header)
    elif head_kind == "bytes":
        head = draw(st.binary(max_size=64))
    elif head_kind == "not-a-map":
        head = pack(draw(JUNK))
    else:
        head = pack({"camera_id": "x" * 5000})
    parts = draw(st.sampled_from([2, 2, 2, 2, 1, 3]))
    return [head, payload, b"extra"][:parts]


# ---- in-process: the Ingest object with real sockets, hundreds of examples ------------------------------


def _cfg(tmp_path, **extra) -> DaemonConfig:
    data = {
        "engine": {"bundle": "unused"},
        "endpoints": {"ingest": f"tcp://127.0.0.1:{free_tcp_port()}", "metrics_port": None},
        "max_frame": {"width": MAX_W, "height": MAX_H, "channels": 3},
        "queue": {"slots": 6, "size": 4},
        "runtime_dir": str(tmp_path),
        "instance": f"fz{time.monotonic_ns() % 10**8}",
        **extra,
    }
    return config_from_mapping(data)


@pytest.fixture(scope="module")
def ingest_env(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("ingest"))
    ring = SlotRing.create(cfg.instance, cfg.queue.slots, cfg.max_frame.nbytes)
    ctx = zmq.Context()
    records = ctx.socket(zmq.PULL)
    records.setsockopt(zmq.LINGER, 0)
    records.bind(ipc_endpoint(cfg.runtime_path, "publisher.ipc"))
    stats = ctx.socket(zmq.PULL)
    stats.setsockopt(zmq.LINGER, 0)
    stats.bind(ipc_endpoint(cfg.runtime_path, "stats.ipc"))
    ingest = Ingest(cfg, ring, ctx)
    try:
        yield ingest, records
    finally:
        ingest.close()
        records.close()
        stats.close()
        ctx.term()
        ring.close()


def _answers(ingest: Ingest, records: zmq.Socket, parts: list[bytes], imagezmq: bool = False) -> list:
    """Feed one message; return the records it produced, or ["queued"] when it was admitted."""
    queued = len(ingest.queue)
    ingest.on_message([zmq.Frame(p) for p in parts], imagezmq)
    out = ["queued"] if len(ingest.queue) > queued else []
    while records.poll(1000 if not out else 5):
        out.append(msgpack.unpackb(records.recv())["record"])
    for desc in ingest.queue:  # isolate the next example: free what this one admitted
        ingest.free.release(desc["slot"])
    ingest.queue.clear()
    assert ingest.free.in_use == 0
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_ingest_answers_every_message_exactly_once(ingest_env, msg):
    ingest, records = ingest_env
    out = _answers(ingest, records, msg)
    assert len(out) == 1, out
    if out[0] != "queued":
        assert out[0]["kind"] == "error" and out[0]["reason"], out[0]


@st.composite
def imagezmq_messages(draw) -> list[bytes]:
    md: dict = {"msg": "izmq"}
    raw = draw(st.booleans())
    if raw:
        md.update(dtype=draw(st.sampled_from(["uint8", "uint16", "float32", "<u2"])))
        md.update(shape=draw(st.lists(DIMS.filter(lambda d: d < 400), min_size=1, max_size=4)))
    elif draw(st.booleans()):
        md["jpg_buffer"] = True
    for key in draw(st.lists(st.sampled_from(["msg", "dtype", "shape"]), max_size=2)):
        md[key] = draw(JUNK.filter(lambda v: not isinstance(v, (bytes, float)) or v == v))
    head = json.dumps(md, default=str).encode() if draw(st.integers(0, 5)) else draw(st.binary(max_size=32))
    if raw and isinstance(md.get("shape"), list) and md.get("dtype") in ("uint8", "uint16"):
        n = int(np.prod([abs(int(d)) for d in md["shape"]], dtype=np.int64))
        n = n * (2 if md["dtype"] == "uint16" else 1) + draw(st.sampled_from([0, 0, 1]))
        payload = bytes(min(n, MAX_PAYLOAD + 1))
    else:
        payload = draw(payloads({"encoding": "jpeg"}))
    return [head, payload]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=imagezmq_messages())
def test_ingest_answers_every_imagezmq_message_exactly_once(ingest_env, msg):
    ingest, records = ingest_env
    out = _answers(ingest, records, msg, imagezmq=True)
    assert len(out) == 1, out
    if out[0] != "queued":
        assert out[0]["kind"] == "error" and out[0]["reason"], out[0]


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_compressed_bombs_are_refused_before_decoding(ingest_env):
    """A few hundred bytes claiming a 60000 x 60000 image: refused from the header, nothing allocated
    (before the fix this raised cv2.error inside ingest and took the daemon down)."""
    ingest, records = ingest_env
    assert encoded_size(_png_header(60000, 60000), "png") == (60000, 60000)
    assert encoded_size(_image("jpeg", 30, 40, 3, 0), "jpeg") == (40, 30)
    head = pack({"v": 1, "camera_id": "c", "frame_id": 1, "timestamp_ns": 1, "encoding": "png"})
    (rec,) = _answers(ingest, records, [head, _png_header(60000, 60000) + bytes(64)])
    assert rec["kind"] == "error" and "60000x60000" in rec["reason"] and "maximum" in rec["reason"]
    jpeg = bytearray(_image("jpeg", 30, 40, 3, 0))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (50000).to_bytes(2, "big") + (50000).to_bytes(2, "big")
    head = pack({"v": 1, "camera_id": "c", "frame_id": 2, "timestamp_ns": 1, "encoding": "jpeg"})
    (rec,) = _answers(ingest, records, [head, bytes(jpeg)])
    assert rec["kind"] == "error" and "50000x50000" in rec["reason"]


# ---- the real daemon: one subprocess for the module -----------------------------------------------------


@pytest.fixture(scope="module", params=["multi", "single"])
def daemon(request, tmp_path_factory, tiny_bundle):
    tmp = tmp_path_factory.mktemp("fuzzd")
    path, data = daemon_config(tmp, tiny_bundle, map_downscale=0, process_mode=request.param)
    proc = DaemonProcess(path, tmp / "daemon.log", instance=data["instance"])
    ep = data["endpoints"]
    try:
        proc.wait_ready(ep["metrics_port"], timeout_s=60)
        with (
            VerdictSubscriber(ep["output"]) as sub,
            FramePublisher(ep["ingest"], "sentinel", send_timeout_s=5.0) as cam,
        ):
            records, probes = handshake(cam, sub, np.zeros((32, 32), np.uint8))
            state = {"records": records, "messages": len(probes)}
            yield proc, data, sub, cam, state
    finally:
        proc.stop()


def _is_sentinel(r, fid: int) -> bool:
    return getattr(r, "camera_id", None) == "sentinel" and r.frame_id == fid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_daemon_fuzz_one_record_each_then_still_serving(daemon, msg):
    proc, data, sub, cam, state = daemon
    cam.send_parts(msg)
    fid = cam.send(np.full((32, 48), 7, np.uint8))
    state["messages"] += 2

    def done(items):
        return any(_is_sentinel(r, fid) for r in items) and any(
            not (r.camera_id == "sentinel") for r in items
        )

    got = collect(sub, 10, 15.0, until=done)
    state["records"] += got
    assert any(_is_sentinel(r, fid) and r.kind == "verdict" for r in got), (got, proc.logs()[-2000:])
    others = [r for r in got if r.camera_id != "sentinel"]
    assert others and all(r.kind in ("error", "verdict") for r in others), got
    assert all(r.reason for r in others if r.kind == "error")
    assert proc.proc.poll() is None


def test_daemon_bad_imagezmq_messages_get_ok_and_an_error(daemon):
    proc, data, sub, cam, state = daemon
    sender = imagezmq.ImageSender(connect_to=data["endpoints"]["imagezmq"])
    sender.zmq_socket.setsockopt(zmq.LINGER, 0)
    sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 10000)
    bad = [
        [b"not json", b"x"],
        [json.dumps(["a list"]).encode(), b"x"],
        [json.dumps({"msg": "izmq", "dtype": "float64", "shape": [2, 2]}).encode(), bytes(32)],
        [json.dumps({"msg": "izmq", "dtype": "uint8", "shape": [4, 4]}).encode(), bytes(15)],
        [json.dumps({"msg": "iz/mq"}).encode(), b"\xff\xd8"],
    ]
    try:
        for parts in bad:
            sender.zmq_socket.send_multipart(parts)
            assert sender.zmq_socket.recv() == b"OK"
        assert sender.send_image("izmq", np.zeros((40, 40), np.uint8)) == b"OK"
    finally:
        sender.close()
    got = collect(
        sub, 100, 15.0, until=lambda items: any(r.camera_id == "izmq" and r.kind == "verdict" for r in items)
    )
    state["records"] += got
    state["messages"] += len(bad) + 1
    errors = [r for r in got if r.kind == "error" and r.camera_id in ("izmq", "unknown")]
    assert len(errors) == len(bad), got
    assert all(r.reason.startswith("imagezmq") for r in errors)
    assert any(r.camera_id == "izmq" and r.kind == "verdict" for r in got)


def test_daemon_accounting_after_fuzz_and_clean_exit(daemon):
    """Runs last in the module: every message got exactly one record, metrics agree, SIGTERM exits 0."""
    proc, data, sub, cam, state = daemon
    port = data["endpoints"]["metrics_port"]
    state["records"] += collect(sub, 10**6, 1.0)

    def settled():
        a = accounting(port)
        return a if a["received"] == state["messages"] == a["answered"] + a["failed"] + a["dropped"] else None

    a = wait_until(settled, 15.0, 0.2, f"accounting of {state['messages']} messages")
    assert len(state["records"]) == state["messages"], (len(state["records"]), a)
    assert proc.terminate(timeout_s=30) == 0, proc.logs()[-3000:]
    fields = stopped_fields(proc.logs())
    assert int(fields["received"]) == int(fields["published"]) == state["messages"]


# ---- SUB ingest, imagezmq PUB/SUB, run --bundle -----------------------------------------------------------


def test_sub_ingest_imagezmq_pubsub_and_bundle_override(tmp_path, tiny_bundle):
    cam_port, izmq_port = free_tcp_port(), free_tcp_port()
    path, data = daemon_config(tmp_path, tmp_path / "no-such-bundle", map_downscale=0)
    data["endpoints"].update(
        ingest=f"tcp://127.0.0.1:{cam_port}",
        ingest_mode="sub",
        imagezmq=f"tcp://127.0.0.1:{izmq_port}",
        imagezmq_mode="sub",
    )
    path.write_text(yaml.safe_dump(data))
    assert daemon_cli(["check-config", str(path)]) == 2  # the configured bundle does not exist
    assert daemon_cli(["check-config", str(path), "--bundle", str(tiny_bundle)]) == 0
    proc = DaemonProcess(
        path, tmp_path / "d.log", instance=data["instance"], args=("--bundle", str(tiny_bundle))
    )
    ep = data["endpoints"]
    sender = None
    try:
        proc.wait_ready(ep["metrics_port"], timeout_s=60)
        with (
            VerdictSubscriber(ep["output"]) as sub,
            FramePublisher(f"tcp://127.0.0.1:{cam_port}", "pubcam", socket_type="pub", bind=True) as cam,
        ):
            records, _ = handshake(cam, sub, np.zeros((32, 32), np.uint8))
            assert records[0].camera_id == "pubcam" and records[0].kind == "verdict"
            sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{izmq_port}", REQ_REP=False)
            sender.zmq_socket.setsockopt(zmq.LINGER, 0)
            izmq, deadline = [], time.monotonic() + 20
            while not izmq and time.monotonic() < deadline:  # slow joiner: PUB drops until connected
                sender.send_image("izmq-pub", np.zeros((32, 32, 3), np.uint8))
                izmq = [r for r in collect(sub, 5, 0.3) if r.camera_id == "izmq-pub"]
            assert izmq and izmq[0].kind == "verdict"
    finally:
        if sender is not None:
            sender.close()
        proc.stop()
    assert str(tiny_bundle) in proc.logs() or "model=tiny-xs" in proc.logs()


# ---- config fuzzing ---------------------------------------------------------------------------------------


def _write(tmp_path, data, name="c.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _base(bundle) -> dict:
    return {"engine": {"bundle": str(bundle), "backend": "onnxruntime"}, "endpoints": {"metrics_port": None}}


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d.update(workers="two"), "workers.count"),
        (lambda d: d.update(queue={"size": 1.5}), "queue.size"),
        (lambda d: d.update(queue={"slots": 4, "size": 8}), "queue.slots"),
        (lambda d: d.update(queue={"drop_policy": "random"}), "queue.drop_policy"),
        (lambda d: d["endpoints"].update(ingest=5555), "endpoints.ingest"),
        (lambda d: d.update(max_frame={"channels": 2}), "max_frame.channels"),
        (lambda d: d.update(inspection={"tile_overlap": 32}), "tile_overlap"),
        (lambda d: d.update(inspection={"tile_overlap": -1}), "tile_overlap"),
        (lambda d: d.update(cameras=[{"id": "a/b"}]), "cameras[0].id"),
        (lambda d: d["engine"].update(bundle="/nonexistent/bundle"), "bundle"),
        (lambda d: d.update(bogus=1), "bogus"),
    ],
)
def test_check_config_names_the_problem(tmp_path, tiny_bundle, capsys, mutate, key):
    data = _base(tiny_bundle)
    mutate(data)
    assert daemon_cli(["check-config", _write(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-daemon check-config: error:") and key in err, err
    assert len(err.strip().splitlines()) == 1 and "fix:" in err, err


def test_invalid_yaml_and_tampered_bundle(tmp_path, tiny_bundle, capsys):
    assert daemon_cli(["check-config", _write(tmp_path, "engine: [unclosed\n  bundle: : :")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert daemon_cli(["check-config", _write(tmp_path, "- just\n- a list\n")]) == 2
    assert "mapping at the top level" in capsys.readouterr().err
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with open(tampered / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    path = _write(tmp_path, _base(tampered))
    assert daemon_cli(["check-config", path]) == 2
    assert "sha256" in capsys.readouterr().err
    # run: refused before anything starts, exit 2 and one error line, no child started
    proc = DaemonProcess(path, tmp_path / "run.log")
    try:
        assert proc.proc.wait(timeout=60) == 2
    finally:
        proc.stop()
    assert "edge-daemon run: error: engine.bundle:" in proc.logs() and "sha256" in proc.logs()
    assert "child.started" not in proc.logs() and "Traceback" not in proc.logs()


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(
        [
            ("workers",),
            ("instance",),
            ("shutdown_timeout_s",),
            ("map_downscale",),
            ("log_level",),
            ("engine", "max_batch"),
            ("engine", "backend"),
            ("engine", "precision"),
            ("engine", "threads"),
            ("endpoints", "output"),
            ("endpoints", "metrics_port"),
            ("queue", "slots"),
            ("queue", "size"),
            ("queue", "worker_credit"),
            ("max_frame", "width"),
            ("max_frame", "bytes_per_sample"),
            ("cameras",),
            ("curve",),
            ("inspection",),
        ]
    ),
    value=JUNK,
)
def test_config_fuzz_only_config_errors(key, value):
    data = _base("/tmp/bundle")
    target = data
    for k in key[:-1]:
        target = target.setdefault(k, {})
    target[key[-1]] = value
    try:
        cfg = config_from_mapping(data)
    except ConfigError as exc:
        assert str(exc).split(":")[0].startswith(key[0]) or str(exc).startswith("config"), str(exc)
    else:
        assert isinstance(cfg, DaemonConfig)
