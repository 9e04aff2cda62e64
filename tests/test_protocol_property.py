"""Property (hypothesis): any sequence of arbitrary multipart messages, from any number of camera ids (valid,
hostile, configured, made up; the seq table shrunk to 8 unconfigured ids so that churn evicts), keeps

- received = answered + failed + dropped per camera label and in total, and messages sent = received +
  the ones the transport refused (over the hard size limit: one counted disconnect each);
- every published topic in the documented set (a valid camera id, ``<id>/map``, ``unknown``), the record's
  camera_id equal to its topic, maps only right after a verdict of the same camera;
- the seq numbering of configured cameras (and ``unknown``) one unbroken run: 0, 1, 2, ... in one epoch.

Ingest and publisher run in this process (``InProcessDaemon``), with real sockets (tcp for the camera).
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_harness import InProcessDaemon, raw_frame

from edge_daemon import publisher
from edge_daemon.cameras import is_camera_id
from edge_daemon.protocol import encode_header

CONFIGURED = ("cam1", "cam2")
PINNED = (*CONFIGURED, "unknown")
LABELS = (*CONFIGURED, "_other", "unknown")
OUTCOMES = ("edge_frames_answered_total", "edge_frames_failed_total", "edge_frames_dropped_total")

VALID_IDS = st.one_of(
    st.sampled_from(CONFIGURED),
    st.sampled_from([f"u{i}" for i in range(12)]),  # 12 ids through a seq table of 8: evicted, back again
    st.sampled_from([f"u{i}" for i in range(12)]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
)
HOSTILE_IDS = st.one_of(
    st.sampled_from(["cam1/map", "cam1/", "a b", "_other", "unknown", "cam1\r\n", "x" * 65, "", "ünï"]),
    st.text(max_size=70),
    st.integers(),
    st.none(),
    st.binary(max_size=8),
)
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.text(max_size=6), st.binary(max_size=6)
)


@st.composite
def header_map(draw) -> dict:
    cam = draw(st.one_of(VALID_IDS, VALID_IDS, VALID_IDS, HOSTILE_IDS))
    enc = draw(st.sampled_from(["mono8", "mono16", "bgr8", "jpeg", "png", "yuv"]))
    head = {
        "v": 1,
        "camera_id": cam,
        "frame_id": draw(st.integers(0, 2**63 - 1)),
        "timestamp_ns": 1,
        "encoding": enc,
    }
    if enc in ("mono8", "mono16", "bgr8"):
        head.update(
            width=draw(st.integers(1, 80)),
            height=draw(st.integers(1, 80)),
            channels=3 if enc == "bgr8" else 1,
        )
    for key in draw(st.lists(st.sampled_from([*head, "extra"]), max_size=2)):
        if draw(st.booleans()):
            head.pop(key, None)
        else:
            head[key] = draw(JUNK)
    return head


def _payload(draw, head: dict) -> bytes:
    choice = draw(st.sampled_from(["exact", "random", "jpeg", "empty"]))
    dims = [head.get(k) for k in ("width", "height", "channels")]
    if choice == "exact" and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 < d < 100 for d in dims
    ):
        n = dims[0] * dims[1] * dims[2] * (2 if head.get("encoding") == "mono16" else 1)
        return bytes(n)
    if choice == "jpeg":
        import cv2

        side = draw(st.integers(1, 80))
        return cv2.imencode(".jpg", np.zeros((side, side), np.uint8))[1].tobytes()
    if choice == "empty":
        return b""
    return draw(st.binary(max_size=64))


@st.composite
def message(draw) -> tuple[str, list[bytes]]:
    """("oversize" | "frame", parts)."""
    kind = draw(st.sampled_from(["header"] * 6 + ["parts"] * 2 + ["oversize"]))
    if kind == "oversize":
        return "oversize", []  # _send makes it: one part over the hard limit
    if kind == "parts":
        return "frame", draw(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
    head = draw(header_map())
    try:
        packed = msgpack.packb(head)
    except (TypeError, ValueError, OverflowError):
        packed = draw(st.binary(max_size=16))
    return "frame", [packed, _payload(draw, head)][: draw(st.sampled_from([2, 2, 2, 1]))]


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publisher, "MAX_SEQ_CAMERAS", 8)
        daemon = InProcessDaemon(cameras=CONFIGURED, maps=True)
    state = {"sent": 0, "oversize": 0, "sockets": [], "examples": 0}
    try:
        yield daemon, state
    finally:
        for sock in state["sockets"]:
            sock.close(linger=0)
        daemon.close()


def _send(daemon, state, kind: str, parts: list[bytes]) -> None:
    if kind == "oversize":  # a fresh connection each: the transport closes it under the message
        sock = daemon.connect()
        state["sockets"].append(sock)
        sock.send_multipart([encode_header("cam1", 1, 1, "jpeg"), bytes(daemon.ingest.hard_limit + 1)])
        state["oversize"] += 1
    else:
        daemon.camera.send_multipart(parts)
        state["sent"] += 1


def _disconnects(daemon) -> float:
    return daemon.counters().get(
        ("edge_transport_events_total", (("event", "disconnected"), ("socket", "frames"))), 0
    )


def _check_topics(messages) -> None:
    previous = None
    for topic, body in messages:
        name = topic.decode("ascii")
        cam, _, suffix = name.partition("/")
        assert cam == "unknown" or is_camera_id(cam), name
        if suffix:
            assert suffix == "map" and previous is not None, name
            assert (
                previous[0] == cam and previous[1]["kind"] == "verdict" and previous[1]["seq"] == body["seq"]
            )
        else:
            assert body["camera_id"] == cam, (name, body["camera_id"])
        previous = (cam, body)


def _check_seq(records) -> None:
    for cam in PINNED:
        mine = [b for t, b in records if t == cam]
        assert [b["seq"] for b in mine] == list(range(len(mine))), cam
        assert len({b["seq_epoch"] for b in mine}) <= 1, cam


def _check_accounting(daemon, state) -> None:
    c = daemon.counters()
    total = 0
    for label in LABELS:
        key = (("camera", label),)
        received = c.get(("edge_frames_received_total", key), 0)
        assert received == sum(c.get((name, key), 0) for name in OUTCOMES), label
        total += received
    assert total == state["sent"] == len(daemon.records())
    assert _disconnects(daemon) == state["oversize"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(batch=st.lists(message(), min_size=1, max_size=12))
def test_any_messages_keep_accounting_topics_and_seq(env, batch):
    daemon, state = env
    state["examples"] += 1  # and a rotation of 12 ids through the table of 8: each is forgotten, then back
    _send(daemon, state, "frame", raw_frame(f"r{state['examples'] % 12}", 0))
    _send(daemon, state, "frame", raw_frame("cam1", 1))
    for kind, parts in batch:
        _send(daemon, state, kind, parts)
    _send(daemon, state, "frame", raw_frame("cam1", 2))
    daemon.pump(
        lambda: len(daemon.records()) == state["sent"] and _disconnects(daemon) == state["oversize"],
        what=f"{state['sent']} records and {state['oversize']} disconnects",
    )
    daemon.settle(0.01)
    _check_topics(daemon.messages)
    _check_seq(daemon.records())
    _check_accounting(daemon, state)


def test_the_property_saw_churn_and_every_kind(env):
    """Runs after the property: the generated traffic did what it is meant to exercise."""
    daemon, state = env
    records = daemon.records()
    epochs: dict[str, set] = {}
    for topic, body in records:
        epochs.setdefault(topic, set()).add(body["seq_epoch"])
    assert len(set(epochs) - set(PINNED)) > 8  # more unconfigured ids than the shrunk seq table holds
    assert any(len(e) > 1 for t, e in epochs.items() if t not in PINNED)  # one was forgotten and came back
    assert {"verdict", "error"} <= {b["kind"] for _, b in records} and "unknown" in epochs
    assert state["oversize"] >= 1
