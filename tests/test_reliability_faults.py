"""Faults: a killed worker, cameras and subscribers that go and come back, a slow subscriber, overload with
both drop policies, SIGTERM under load, SIGKILL of the supervisor, a dead publisher; the single-process
mode's own faults (its process killed). The real daemon runs as a subprocess on loopback (tiny bundle,
ONNX Runtime); tests that apply to both process modes run in both; every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import signal
import time

import msgpack
import numpy as np
import pytest
import yaml
import zmq
from daemon_helpers import (
    DaemonProcess,
    accounting,
    child_pids,
    collect,
    daemon_config,
    handshake,
    rss_bytes,
    stopped_fields,
    wait_until,
)

from edge_daemon.client import FramePublisher, VerdictSubscriber
from edge_daemon.config import config_from_mapping
from edge_daemon.ingest import Ingest
from edge_daemon.protocol import encode_header
from edge_daemon.shm import SHM_DIR, SlotRing, segment_prefix
from edge_daemon.transport import free_tcp_port, ipc_endpoint

pytest.importorskip("onnxruntime")


def _start(tmp_path, bundle, name="daemon", endpoints_extra=None, **overrides):
    path, data = daemon_config(tmp_path, bundle, **overrides)
    if endpoints_extra:
        data["endpoints"].update(endpoints_extra)
        path.write_text(yaml.safe_dump(data))
    proc = DaemonProcess(path, tmp_path / f"{name}.log", instance=data["instance"])
    proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=60)
    return proc, data


def _segments(instance: str) -> list[str]:
    return [p.name for p in SHM_DIR.iterdir() if p.name.startswith(segment_prefix(instance))]


def _gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state  # exited, waiting to be reaped by init


def _one_each(records, sent_ids) -> dict:
    by_frame: dict = {}
    for r in records:
        by_frame.setdefault(r.frame_id, []).append(r)
    assert sorted(by_frame) == sorted(sent_ids), (len(by_frame), len(sent_ids))
    assert all(len(v) == 1 for v in by_frame.values())
    return {f: v[0] for f, v in by_frame.items()}


def _settled(port: int, expect: int) -> dict:
    def ok():
        a = accounting(port)
        return a if a["received"] == expect == a["answered"] + a["failed"] + a["dropped"] else None

    return wait_until(ok, 15.0, 0.2, f"accounting of {expect} messages")


# ---- worker killed mid-stream ----------------------------------------------------------------------------


def test_worker_kill9_mid_stream(tmp_path, tiny_bundle):
    proc, data = _start(tmp_path, tiny_bundle, map_downscale=0)
    ep = data["endpoints"]
    rng = np.random.default_rng(0)
    try:
        with (
            VerdictSubscriber(ep["output"], ["cam1"]) as sub,
            FramePublisher(ep["ingest"], "cam1", hwm=1000) as cam,
        ):
            records, sent = handshake(cam, sub, np.zeros((32, 32), np.uint8))
            sent += [cam.send(rng.integers(0, 256, (256, 256), dtype=np.uint8)) for _ in range(12)]
            os.kill(child_pids(proc.logs())[("worker", 0, 1)], signal.SIGKILL)
            sent += [cam.send(rng.integers(0, 256, (64, 64), dtype=np.uint8)) for _ in range(10)]
            wait_until(
                lambda: "event=worker.ready worker=0 gen=2" in proc.logs(), 30.0, 0.1, "worker restart"
            )
            tail = [cam.send(rng.integers(0, 256, (64, 64), dtype=np.uint8)) for _ in range(5)]
            sent += tail
            records += collect(sub, len(sent) - len(records), 30.0)
        first = _one_each(records, sent)
        reasons = {r.reason for r in first.values() if r.kind != "verdict"}
        assert reasons <= {"worker lost", "worker restarted", "queue full (drop-oldest)"}, reasons
        assert all(first[f].kind == "verdict" for f in tail)  # the stream resumed on the new worker
        a = _settled(ep["metrics_port"], len(sent))
        assert a["_raw"]['edge_worker_restarts_total{worker="0"}'] == 1
        assert proc.terminate(timeout_s=30) == 0, proc.logs()[-3000:]
        fields = stopped_fields(proc.logs())
        assert int(fields["received"]) == int(fields["published"]) == len(sent)
    finally:
        proc.stop()


# ---- cameras and subscribers that go and come back; a slow subscriber -----------------------------------


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_camera_and_subscriber_reconnect_and_slow_subscriber(tmp_path, tiny_bundle, mode):
    proc, data = _start(
        tmp_path, tiny_bundle, map_downscale=0, endpoints_extra={"output_hwm": 300}, process_mode=mode
    )
    ep = data["endpoints"]
    frame = np.zeros((32, 32), np.uint8)
    try:
        with VerdictSubscriber(ep["output"], ["cam1"]) as sub:
            with FramePublisher(ep["ingest"], "cam1") as cam:
                handshake(cam, sub, frame)
            with FramePublisher(ep["ingest"], "cam1") as cam:  # the camera reconnects (new socket)
                fid = cam.send(frame, frame_id=10_000)
                got = collect(sub, 50, 15.0, until=lambda r: any(v.frame_id == fid for v in r))
                assert any(v.frame_id == fid and v.kind == "verdict" for v in got)
        with FramePublisher(ep["ingest"], "cam1") as cam:
            cam.send(frame, frame_id=20_000)  # nobody listens: published to no one, still counted
            with VerdictSubscriber(ep["output"], ["cam1"]) as sub:  # a subscriber comes back
                got, _ = handshake(cam, sub, frame)
                assert got[0].kind == "verdict" and got[0].seq is not None

        # slow subscriber: stops reading while 3000 records of 4 kB go out (error records whose reason quotes
        # a 4000-character encoding: 12 MB, more than the kernel's socket buffers); the fast one misses
        # nothing, the slow one finds gaps in seq (ZeroMQ drops only for the reader past its high-water mark)
        n, chunk = 3000, 100  # a chunk fits the high-water mark: the fast reader cannot lose any
        with (
            VerdictSubscriber(ep["output"], ["flood"]) as fast,
            VerdictSubscriber(ep["output"], ["flood"], hwm=1) as slow,
            FramePublisher(ep["ingest"], "flood", hwm=1000, send_timeout_s=10) as cam,
        ):
            handshake(cam, fast, frame)
            handshake(cam, slow, frame)  # probes until the slow subscriber is connected too
            while fast.recv(0.2) is not None:
                pass
            got = []
            for c in range(n // chunk):  # paced so that the fast reader keeps up
                for i in range(c * chunk, (c + 1) * chunk):
                    head = msgpack.packb(
                        {
                            "v": 1,
                            "camera_id": "flood",
                            "frame_id": i,
                            "timestamp_ns": 1,
                            "encoding": "x" * 4000,
                        }
                    )
                    cam.send_parts([head, b"x"])
                got += collect(fast, chunk, 20.0)
            marker = cam.send(frame, frame_id=99_999)
            got += collect(fast, 1, 20.0)
            assert len(got) == n + 1 and got[-1].frame_id == marker and fast.missed == 0
            assert all("unknown encoding" in r.reason for r in got[:-1])
            slow_got, first_seq = [], None
            while len(slow_got) <= n + 1:  # the slow reader catches up with what it still has
                item = slow.recv(0.5)
                if item is None:
                    break
                slow_got.append(item)
            marker2 = cam.send(frame, frame_id=100_000)  # the marker may have been dropped: a second one
            assert collect(fast, 1, 20.0)[0].frame_id == marker2 and fast.missed == 0
            slow_got += collect(slow, 1, 20.0)
            assert slow_got[-1].frame_id == marker2, slow_got[-1]
            assert slow.missed > 0 and len(slow_got) < n, (len(slow_got), slow.missed)
            first_seq = slow_got[0].seq
            assert len(slow_got) + slow.missed == slow_got[-1].seq - first_seq + 1  # gaps add up
        assert proc.proc.poll() is None
        assert proc.terminate(timeout_s=30) == 0
    finally:
        proc.stop()


# ---- overload ---------------------------------------------------------------------------------------------


def _tree_rss(proc: DaemonProcess) -> int:
    pids = [proc.proc.pid, *child_pids(proc.logs()).values()]
    return sum(rss_bytes(p) for p in pids)


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_overload_drop_oldest_bounded_then_sigterm_under_load(tmp_path, tiny_bundle, mode):
    proc, data = _start(
        tmp_path,
        tiny_bundle,
        map_downscale=0,
        queue={"slots": 12, "size": 4, "worker_credit": 2, "drop_policy": "drop-oldest"},
        process_mode=mode,
    )
    ep = data["endpoints"]
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)]
    try:
        with (
            VerdictSubscriber(ep["output"], ["cam1"]) as sub,
            FramePublisher(ep["ingest"], "cam1", hwm=2000, send_timeout_s=10) as cam,
        ):
            records, sent = handshake(cam, sub, frames[0])
            rss = []
            for _ in range(3):
                ids = [cam.send(frames[i % 4]) for i in range(120)]
                sent += ids
                records += collect(sub, len(sent) - len(records), 60.0)
                first = _one_each(records, sent)
                assert first[ids[-1]].kind == "verdict"  # drop-oldest keeps the newest frame
                rss.append(_tree_rss(proc))
            drops = [r for r in first.values() if r.kind == "drop"]
            assert drops and {r.reason for r in drops} == {"queue full (drop-oldest)"}
            assert all(r.kind in ("verdict", "drop") for r in first.values())
            a = _settled(ep["metrics_port"], len(sent))
            assert a["dropped"] == len(drops)
            assert rss[2] < rss[0] * 1.15 + (8 << 20), rss  # bounded: no growth with more frames

            # SIGTERM while a burst is still arriving: every message the daemon took gets its record
            burst = [cam.send(frames[i % 4]) for i in range(60)]
            proc.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            code = proc.proc.wait(timeout=30)
            elapsed = time.monotonic() - t0
            records += collect(sub, 1000, 2.0)
        assert code == 0 and elapsed < data["shutdown_timeout_s"] + 2, (code, elapsed, proc.logs()[-3000:])
        fields = stopped_fields(proc.logs())
        assert fields["clean"] == "True" and int(fields["received"]) == int(fields["published"])
        assert int(fields["received"]) == len(records) >= len(sent)
        assert len(records) <= len(sent) + len(burst)
        assert not _segments(data["instance"])
    finally:
        proc.stop()


# ---- drop policies and slot exhaustion, in-process (deterministic) ---------------------------------------


@pytest.fixture
def ingest_factory(tmp_path):
    made = []

    def make(**queue):
        run = tmp_path / f"r{len(made)}"
        run.mkdir()
        cfg = config_from_mapping(
            {
                "engine": {"bundle": "unused"},
                "endpoints": {"ingest": f"tcp://127.0.0.1:{free_tcp_port()}", "metrics_port": None},
                "max_frame": {"width": 64, "height": 64, "channels": 1},
                "queue": queue,
                "runtime_dir": str(run),
                "instance": f"dp{os.getpid()}{len(made)}",
            }
        )
        ring = SlotRing.create(cfg.instance, cfg.queue.slots, cfg.max_frame.nbytes)
        ctx = zmq.Context()
        socks = {}
        for name, kind in (("publisher.ipc", zmq.PULL), ("stats.ipc", zmq.PULL)):
            socks[name] = ctx.socket(kind)
            socks[name].setsockopt(zmq.LINGER, 0)
            socks[name].bind(ipc_endpoint(run, name))
        ingest = Ingest(cfg, ring, ctx)
        work = ctx.socket(zmq.PULL)
        work.setsockopt(zmq.LINGER, 0)
        work.connect(ipc_endpoint(run, "work-0.ipc"))
        socks["work"] = work
        made.append((ingest, ctx, ring, socks))
        return ingest, socks

    yield make
    for ingest, ctx, ring, socks in made:
        ingest.close()
        for s in socks.values():
            s.close()
        ctx.term()
        ring.close()


def _frame(fid: int) -> list:
    return [zmq.Frame(encode_header("c", fid, 1, "mono8", 8, 8, 1)), zmq.Frame(bytes(64))]


def _drain(sock: zmq.Socket, expect: int) -> list[dict]:
    out = []
    while len(out) < expect and sock.poll(2000):
        out.append(msgpack.unpackb(sock.recv()))
    return out


def test_drop_policies_and_no_free_slot(ingest_factory):
    # drop-oldest: no worker, queue of 3 -> frames 0..4 in: 0 and 1 dropped, 2..4 wait
    ingest, socks = ingest_factory(slots=4, size=3, drop_policy="drop-oldest")
    for fid in range(5):
        ingest.on_message(_frame(fid), False)
    recs = [m["record"] for m in _drain(socks["publisher.ipc"], 2)]
    assert [(r["frame_id"], r["kind"], r["reason"]) for r in recs] == [
        (0, "drop", "queue full (drop-oldest)"),
        (1, "drop", "queue full (drop-oldest)"),
    ]
    assert [d["frame_id"] for d in ingest.queue] == [2, 3, 4] and ingest.free.in_use == 3

    # reject-newest: the frames that find the queue full are the ones refused
    ingest, socks = ingest_factory(slots=4, size=3, drop_policy="reject-newest")
    for fid in range(5):
        ingest.on_message(_frame(fid), False)
    recs = [m["record"] for m in _drain(socks["publisher.ipc"], 2)]
    assert [(r["frame_id"], r["reason"]) for r in recs] == [(3, "queue full (reject-newest)")] * 1 + [
        (4, "queue full (reject-newest)")
    ]
    assert [d["frame_id"] for d in ingest.queue] == [0, 1, 2]

    # no free slot: a worker holding more frames than there are spare slots (credit 4 > slots - size)
    ingest, socks = ingest_factory(slots=3, size=2, worker_credit=4)
    ingest.on_control({"t": "hello", "worker": 0, "gen": 1, "credit": 4})
    for fid in range(5):
        ingest.on_message(_frame(fid), False)
        ingest.dispatch()
    descs = _drain(socks["work"], 3)
    assert [d["frame_id"] for d in descs] == [0, 1, 2]
    recs = [m["record"] for m in _drain(socks["publisher.ipc"], 2)]
    assert [(r["frame_id"], r["kind"], r["reason"]) for r in recs] == [
        (3, "drop", "no free shared-memory slot"),
        (4, "drop", "no free shared-memory slot"),
    ]
    ingest.on_control({"t": "done", "worker": 0, "gen": 1, "slots": [descs[0]["slot"]]})
    ingest.on_message(_frame(5), False)
    ingest.dispatch()
    assert _drain(socks["work"], 1)[0]["frame_id"] == 5  # a returned slot is used again
    # a worker that dies: its frames get "worker lost", slots come back
    ingest.on_control({"t": "worker_lost", "worker": 0, "gen": 1})
    lost = [m["record"] for m in _drain(socks["publisher.ipc"], 3)]
    assert sorted(r["frame_id"] for r in lost) == [1, 2, 5] and {r["reason"] for r in lost} == {"worker lost"}
    assert ingest.free.in_use == 0 and ingest.n_inflight == 0


# ---- SIGKILL of the supervisor; a dead publisher -----------------------------------------------------


def test_supervisor_sigkill_then_restart_cleans_and_dead_publisher_is_fatal(tmp_path, tiny_bundle):
    path, data = daemon_config(tmp_path, tiny_bundle, map_downscale=0)
    port = data["endpoints"]["metrics_port"]
    first = DaemonProcess(path, tmp_path / "first.log", instance=data["instance"])
    second = None
    try:
        first.wait_ready(port, timeout_s=60)
        children = child_pids(first.logs())
        assert len(children) == 3
        left = _segments(data["instance"])
        assert len(left) == 1
        first.proc.kill()
        first.proc.wait(timeout=10)
        wait_until(lambda: all(_gone(p) for p in children.values()), 20.0, 0.1, "children exit (PDEATHSIG)")
        assert _segments(data["instance"]) == left  # nobody unlinked it: the next start must

        second = DaemonProcess(path, tmp_path / "second.log", instance=data["instance"])
        second.wait_ready(port, timeout_s=60)
        assert f"event=shm.cleaned segments={left[0]}" in second.logs()
        assert left[0] not in _segments(data["instance"]) and len(_segments(data["instance"])) == 1

        # a dead publisher is fatal: exit 1 quickly, every child gone, shared memory removed
        kids = child_pids(second.logs())
        os.kill(kids[("publisher", 0, 1)], signal.SIGKILL)
        assert second.proc.wait(timeout=30) == 1
        assert "event=child.fatal" in second.logs() and "role=publisher" in second.logs()
        wait_until(lambda: all(_gone(p) for p in kids.values()), 20.0, 0.1, "children exit")
        assert not _segments(data["instance"])
    finally:
        first.stop()
        if second is not None:
            second.stop()


# ---- single-process mode: the one process killed, the supervisor killed ------------------------------


def test_single_process_killed_is_fatal_and_supervisor_sigkill_leaves_nothing(tmp_path, tiny_bundle):
    """process_mode single: a kill -9 of its one process is fatal like a dead ingest or publisher (exit 1,
    systemd restarts the unit; the frames it held get no record: docs/reliability.md); a SIGKILL of the
    supervisor takes the process with it, and no shared memory is ever created."""
    path, data = daemon_config(tmp_path, tiny_bundle, map_downscale=0, process_mode="single")
    port = data["endpoints"]["metrics_port"]
    first = DaemonProcess(path, tmp_path / "first.log", instance=data["instance"])
    second = None
    try:
        first.wait_ready(port, timeout_s=60)
        children = child_pids(first.logs())
        assert list(children) == [("single", 0, 1)]
        assert not _segments(data["instance"])
        first.proc.kill()
        first.proc.wait(timeout=10)
        wait_until(lambda: all(_gone(p) for p in children.values()), 20.0, 0.1, "exit by PDEATHSIG")

        second = DaemonProcess(path, tmp_path / "second.log", instance=data["instance"])
        second.wait_ready(port, timeout_s=60)  # the lock was released with the dead supervisor
        ep = data["endpoints"]
        with VerdictSubscriber(ep["output"], ["cam1"]) as sub, FramePublisher(ep["ingest"], "cam1") as cam:
            got, _ = handshake(cam, sub, np.zeros((32, 32), np.uint8))
            assert got[0].kind == "verdict"
        kids = child_pids(second.logs())
        os.kill(kids[("single", 0, 1)], signal.SIGKILL)
        assert second.proc.wait(timeout=30) == 1
        assert "event=child.fatal" in second.logs() and "role=single" in second.logs()
        assert "role=single index=0 gen=2" not in second.logs()  # never restarted in place
    finally:
        first.stop()
        if second is not None:
            second.stop()
