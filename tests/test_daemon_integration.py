"""The real daemon as a subprocess (tiny bundle, ONNX Runtime): frames from the client library and from the
real imagezmq ImageSender, bad messages, metrics over HTTP, SIGTERM drain with exit 0 and full accounting;
in both process modes (multi: ingest, worker, publisher processes, over tcp; single: one process, frames and
records over ipc unix sockets)."""

from __future__ import annotations

import time

import cv2
import imagezmq
import msgpack
import numpy as np
import pytest
import yaml
import zmq
from daemon_helpers import DaemonProcess, daemon_config, metric_sum, parse_metrics, scrape, wait_until

from edge_daemon.client import FramePublisher, VerdictSubscriber
from edge_daemon.protocol import encode_header
from edge_daemon.shm import SHM_DIR, segment_prefix

pytest.importorskip("onnxruntime")


def _collect(sub: VerdictSubscriber, n: int, timeout_s: float) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        item = sub.recv(0.2)
        if item is not None:
            out.append(item)
    return out


def _handshake(pub: FramePublisher, sub: VerdictSubscriber, frame: np.ndarray, timeout_s: float = 15.0):
    """Send probe frames until the subscription is live (a verdict comes back); no sleeps.

    Returns (records received so far, frame ids of every probe sent): late probe records may follow."""
    assert sub.wait_connected(timeout_s), "subscriber never connected to the daemon's output"
    got, probes, deadline = [], [], time.monotonic() + timeout_s
    while not got and time.monotonic() < deadline:
        probes.append(pub.send(frame))
        got = _collect(sub, 1, 0.3)
    assert got, "no verdict for probe frames: subscription never became live"
    return got, probes


def _daemon(tmp_path, bundle, mode: str):
    path, data = daemon_config(tmp_path, bundle, process_mode=mode)
    if mode == "single":  # and frames in, records out over unix sockets (a camera on the same PC)
        rt = data["runtime_dir"]
        data["endpoints"].update(ingest=f"ipc://{rt}/frames.sock", output=f"ipc://{rt}/records.sock")
        path.write_text(yaml.safe_dump(data))
    proc = DaemonProcess(path, tmp_path / "daemon.log", instance=data["instance"])
    try:
        proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=45)
        yield proc, data
    finally:
        proc.stop()


@pytest.fixture(params=["multi", "single"])
def daemon(request, tmp_path, tiny_bundle):
    """The daemon in both process modes (docs/architecture.md)."""
    yield from _daemon(tmp_path, tiny_bundle, request.param)


@pytest.fixture
def multi_daemon(tmp_path, tiny_bundle):
    yield from _daemon(tmp_path, tiny_bundle, "multi")


def test_daemon_end_to_end(daemon):
    proc, data = daemon
    ep = data["endpoints"]
    rng = np.random.default_rng(0)
    with (
        VerdictSubscriber(ep["output"], maps=True) as sub,
        FramePublisher(ep["ingest"], "cam1") as cam1,
        FramePublisher(ep["ingest"], "cam2") as cam2,
    ):
        records, probes = _handshake(cam1, sub, rng.integers(0, 256, (64, 64), dtype=np.uint8))
        sent = {("cam1", p) for p in probes}
        for i in range(4):
            fid = cam1.send(rng.integers(0, 256, (64, 96), dtype=np.uint8))
            sent.add(("cam1", fid))
            sent.add(
                (
                    "cam2",
                    cam2.send(
                        rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), frame_id=100 + i, encoding="jpeg"
                    ),
                )
            )
        sent.add(
            ("cam2", cam2.send(rng.integers(0, 256, (40, 40), dtype=np.uint8), frame_id=200, encoding="png"))
        )
        # bad messages: each must come back as an error record with a reason
        cam1.send_parts([b"\xc1not msgpack", b"x"])
        cam1.send_parts([encode_header("cam1", 7, 1, "mono8", 10, 10, 1), b"short"])
        cam1.send_parts([encode_header("cam1", 8, 1, "jpeg"), b"\xff\xd8\xff truncated"])
        cam1.send_parts([msgpack.packb({"v": 1, "camera_id": "cam1"})])
        cam1.send_parts([encode_header("cam1", 9, 1, "mono8", 1000, 1000, 1), bytes(1000 * 1000)])
        # the real imagezmq ImageSender: REQ/REP, array and JPEG; msg is the camera id
        sender = imagezmq.ImageSender(connect_to=ep["imagezmq"])
        sender.zmq_socket.setsockopt(zmq.LINGER, 0)
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 10000)
        try:
            assert sender.send_image("izmq", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) == b"OK"
            ok, jpg = cv2.imencode(".jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            assert ok and sender.send_jpg("izmq", jpg) == b"OK"
        finally:
            sender.close()
        good = len(sent) - len(records) + 2  # still to come: good frames (+ 2 imagezmq), verdict and map each
        items = _collect(sub, 2 * good + 5, 20.0)
    verdicts = [v for v in records + items if getattr(v, "kind", None) == "verdict"]
    maps = [m for m in items if not hasattr(m, "kind")]
    errors = [v for v in items if getattr(v, "kind", None) == "error"]
    assert {(v.camera_id, v.frame_id) for v in verdicts if v.camera_id != "izmq"} == sent
    assert sorted(v.frame_id for v in verdicts if v.camera_id == "izmq") == [0, 1], [
        v for v in items if getattr(v, "camera_id", "") == "izmq"
    ]
    assert all(v.verdict in ("PASS", "FAIL") and v.model_id.startswith("tiny-xs") for v in verdicts)
    assert all(v.verdict == "PASS" and v.threshold == 1000.0 for v in verdicts if v.camera_id == "cam2")
    assert all("infer" in v.timings_ms and v.receive_ns >= v.capture_ns for v in verdicts)
    assert maps and all(m.map.dtype == np.float32 and m.map.ndim == 2 for m in maps)
    reasons = sorted(e.reason for e in errors)
    assert len(errors) == 5, reasons
    assert any("msgpack" in r for r in reasons) and any("payload is 5 bytes" in r for r in reasons)
    assert any("could not be decoded" in r for r in reasons) and any("2 message parts" in r for r in reasons)
    assert any("exceeds the configured maximum" in r or "over the configured maximum" in r for r in reasons)
    assert {e.camera_id for e in errors} <= {"cam1", "unknown"}

    def scraped():  # children send counter snapshots every 0.5 s
        status, text = scrape(ep["metrics_port"])
        return status == 200 and "# TYPE edge_frames_received_total counter" in text

    wait_until(scraped, 10.0, 0.1, "received counters in /metrics")
    n_records = len(verdicts) + len(errors)
    code = proc.terminate(timeout_s=30)
    logs = proc.logs()
    assert code == 0, logs
    assert "event=daemon.stopped clean=True" in logs
    stopped = next(line for line in logs.splitlines() if "event=daemon.stopped" in line)
    fields = dict(kv.split("=", 1) for kv in stopped.split() if "=" in kv)
    assert int(fields["received"]) == int(fields["published"]) == n_records
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(segment_prefix(data["instance"]))]


def test_metrics_account_for_every_frame(daemon):
    proc, data = daemon
    ep = data["endpoints"]
    rng = np.random.default_rng(1)
    with VerdictSubscriber(ep["output"]) as sub, FramePublisher(ep["ingest"], "cam1") as cam:
        got, probes = _handshake(cam, sub, rng.integers(0, 256, (32, 32), dtype=np.uint8))
        for _ in range(6):
            cam.send(rng.integers(0, 256, (64, 64), dtype=np.uint8))
        cam.send_parts([b"junk"])
        got += _collect(sub, len(probes) - len(got) + 7, 15.0)

    def settled():
        m = parse_metrics(scrape(ep["metrics_port"])[1])
        received = metric_sum(m, "edge_frames_received_total")
        answered = metric_sum(m, "edge_frames_answered_total")
        failed = metric_sum(m, "edge_frames_failed_total")
        dropped = metric_sum(m, "edge_frames_dropped_total")
        infer = m.get('edge_stage_latency_ms_count{stage="infer"}')  # worker snapshots come separately
        balanced = received == len(got) and received == answered + failed + dropped
        return m if balanced and infer == answered else None

    m = wait_until(settled, 10.0, 0.2, "metrics accounting (received = answered + failed + dropped)")
    assert metric_sum(m, "edge_frames_failed_total") == 1
    assert m['edge_protocol_errors_total{reason="parts"}'] == 1  # [b"junk"]: one part
    assert m['edge_frames_failed_total{camera="unknown"}'] == 1
    assert metric_sum(m, "edge_batch_size_count") >= 1
    assert 'edge_stage_latency_ms_count{stage="infer"}' in m
    assert m["edge_workers_healthy"] == 1
    assert proc.terminate(timeout_s=30) == 0


def test_worker_killed_is_restarted_and_frames_accounted(multi_daemon):
    import os
    import re
    import signal

    proc, data = multi_daemon
    ep = data["endpoints"]
    rng = np.random.default_rng(2)
    pid = int(re.search(r"event=child.started role=worker index=0 gen=1 pid=(\d+)", proc.logs()).group(1))
    with VerdictSubscriber(ep["output"]) as sub, FramePublisher(ep["ingest"], "cam1") as cam:
        records, probes = _handshake(cam, sub, rng.integers(0, 256, (32, 32), dtype=np.uint8))
        sent = [cam.send(rng.integers(0, 256, (128, 128), dtype=np.uint8)) for _ in range(8)]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "event=worker.ready worker=0 gen=2" in proc.logs(), 30.0, 0.1, "worker restart")
        sent += [cam.send(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(3)]
        records += _collect(sub, len(probes) - len(records) + len(sent), 20.0)
    by_frame = {}
    for r in records:
        by_frame.setdefault(r.frame_id, []).append(r)
    assert sorted(by_frame) == sorted(probes + sent) and all(len(v) == 1 for v in by_frame.values())
    assert all(r.kind == "verdict" or r.reason == "worker lost" for r in records)
    assert all(by_frame[f][0].kind == "verdict" for f in sent[-3:])  # the new worker answers
    m = wait_until(
        lambda: parse_metrics(scrape(ep["metrics_port"])[1]).get('edge_worker_restarts_total{worker="0"}'),
        10.0,
        0.2,
        "restart counter",
    )
    assert m == 1
    assert proc.terminate(timeout_s=30) == 0, proc.logs()
