"""Client library: cameras send frames, PLCs/HMIs receive verdicts. Needs pyzmq, msgpack, numpy (and
OpenCV only for JPEG/PNG encoding).

    with FramePublisher("tcp://line-pc:5555", "cam1") as cam:
        cam.send(frame)                       # raw mono8/mono16/bgr8 chosen from the array
        cam.send(frame, encoding="jpeg")

    with VerdictSubscriber("tcp://line-pc:5556", cameras=["cam1"]) as sub:
        v = sub.recv(timeout_s=1.0)           # Verdict or None
        for v in sub: ...                     # forever (each wait has a timeout inside)

Every socket has linger 0 and every receive a timeout. Topics are prefixes in ZeroMQ, so the subscriber
filters on the exact camera id: "cam1" does not receive "cam10". Anything on the output that does not match
docs/protocol.md (a malformed record or map) is skipped and counted in ``VerdictSubscriber.malformed``,
never raised.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from .cameras import camera_id_problem
from .protocol import PROTOCOL_VERSION, encode_header

__all__ = ["FramePublisher", "VerdictSubscriber", "Verdict", "AnomalyMap", "CurveClientKeys"]


@dataclass(frozen=True)
class CurveClientKeys:
    """CURVE client: this client's key pair file and the daemon's public key file (zmq.auth format)."""

    client_secret: str
    server_public: str

    def apply(self, sock: zmq.Socket) -> None:
        from .transport import secure_client

        secure_client(sock, self.client_secret, self.server_public)


@dataclass(frozen=True)
class Verdict:
    """One record of the verdict stream (see docs/protocol.md)."""

    kind: str  # "verdict" | "error" | "drop"
    camera_id: str
    frame_id: int | None
    verdict: str | None  # "PASS" | "FAIL" for kind "verdict"
    score: float | None
    threshold: float | None
    regions: list[dict] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    capture_ns: int | None = None
    receive_ns: int | None = None
    model_id: str = ""
    reason: str = ""
    code: str = ""  # reason class of errors and drops (docs/protocol.md); "" for verdicts
    v: int = PROTOCOL_VERSION
    seq: int | None = None  # per-camera publication counter (gaps: records this subscriber missed)
    seq_epoch: int | None = None  # which numbering ``seq`` belongs to (changes: numbering restarted)

    @classmethod
    def from_record(cls, record: dict) -> Verdict:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in known})

    @property
    def ok(self) -> bool:
        return self.kind == "verdict" and self.verdict == "PASS"


@dataclass(frozen=True)
class AnomalyMap:
    camera_id: str
    frame_id: int
    map: np.ndarray  # float32, down-scaled
    seq: int | None = None  # the seq of the verdict this map belongs to

    @classmethod
    def from_message(cls, camera_id: str, body: dict) -> AnomalyMap:
        """KeyError / TypeError / ValueError when ``body`` is not a map message."""
        shape = body["shape"]
        if body["dtype"] != "float32" or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"not a float32 2-D map: {body['dtype']!r} {shape!r}")
        arr = np.frombuffer(body["data"], dtype="<f4").reshape(shape)
        return cls(camera_id, body["frame_id"], arr, body.get("seq"))


def _raw_encoding(frame: np.ndarray, color: str) -> tuple[str, int]:
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        if frame.dtype == np.uint8:
            return "mono8", 1
        if frame.dtype == np.uint16:
            return "mono16", 1
    elif frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8:
        return color, 3
    raise ValueError(
        f"cannot send a {frame.dtype} frame of shape {frame.shape} raw: use uint8 mono/3-channel "
        f"or uint16 mono"
    )


class FramePublisher:
    """Camera side. PUSH connect by default (``socket_type="pub"`` + ``bind=True`` for a SUB ingest)."""

    def __init__(
        self,
        endpoint: str,
        camera_id: str,
        *,
        socket_type: str = "push",
        bind: bool = False,
        send_timeout_s: float = 1.0,
        hwm: int = 16,
        close_linger_s: float | None = None,
        color: str = "bgr8",
        jpeg_quality: int = 90,
        curve: CurveClientKeys | None = None,
        context: zmq.Context | None = None,
    ):
        problem = camera_id_problem(camera_id)
        if problem:
            raise ValueError(problem)
        if color not in ("bgr8", "rgb8"):
            raise ValueError(f"color must be bgr8 or rgb8, got {color!r}")
        if socket_type not in ("push", "pub"):
            raise ValueError(f"socket_type must be push or pub, got {socket_type!r}")
        self.camera_id, self.color, self.jpeg_quality = camera_id, color, jpeg_quality
        # frames accepted by send() are still queued in ZeroMQ: close() waits this long to deliver them
        self.close_linger_s = send_timeout_s if close_linger_s is None else close_linger_s
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH if socket_type == "push" else zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.bind(endpoint) if bind else self._sock.connect(endpoint)
        self._ids = itertools.count()

    def encode(self, frame: np.ndarray, frame_id: int, timestamp_ns: int, encoding: str = "raw") -> list:
        """The two message parts for ``frame`` (header, payload)."""
        frame = np.ascontiguousarray(frame)
        if encoding == "raw":
            enc, channels = _raw_encoding(frame, self.color)
            header = encode_header(
                self.camera_id, frame_id, timestamp_ns, enc, frame.shape[1], frame.shape[0], channels
            )
            return [header, memoryview(frame).cast("B")]
        if encoding not in ("jpeg", "png"):
            raise ValueError(f"encoding must be raw, jpeg or png, got {encoding!r}")
        import cv2

        params = [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality] if encoding == "jpeg" else []
        ok, buf = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", frame, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {frame.dtype} {frame.shape} frame as {encoding}")
        return [encode_header(self.camera_id, frame_id, timestamp_ns, encoding), buf.tobytes()]

    def send(
        self,
        frame: np.ndarray,
        frame_id: int | None = None,
        timestamp_ns: int | None = None,
        encoding: str = "raw",
    ) -> int:
        """Send one frame; returns its frame id. TimeoutError when the daemon does not take it in time."""
        frame_id = next(self._ids) if frame_id is None else int(frame_id)
        parts = self.encode(
            frame, frame_id, time.time_ns() if timestamp_ns is None else timestamp_ns, encoding
        )
        self.send_parts(parts)
        return frame_id

    def send_parts(self, parts: list) -> None:
        """Send raw message parts as they are (tests use it for malformed messages)."""
        try:
            self._sock.send_multipart(parts, copy=False)
        except zmq.Again as exc:
            raise TimeoutError(
                f"daemon did not accept the frame within the send timeout ({self.camera_id})"
            ) from exc

    def close(self) -> None:
        """Close; frames already sent get up to ``close_linger_s`` to leave (then they are dropped)."""
        self._sock.close(linger=int(self.close_linger_s * 1000))
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VerdictSubscriber:
    """PLC/HMI side: SUB connect to the daemon's output; ``recv`` returns Verdict (or AnomalyMap when
    ``maps=True`` and a map arrives) or None on timeout.

    ``missed`` counts records this subscriber did not get, from gaps in each camera's ``seq`` (a reader
    slower than the daemon past its high-water mark loses records: ZeroMQ PUB drops them for that reader
    only); ``missed_by_camera`` has the detail. ``resets`` counts changes of a camera's ``seq_epoch``: its
    numbering restarted (the daemon restarted, or an unconfigured camera's counter was forgotten under id
    churn), so records in between may be missing, how many is unknown; the new numbering's first ``seq``
    records are counted as missed. ``malformed`` counts messages that do not follow docs/protocol.md."""

    def __init__(
        self,
        endpoint: str,
        cameras: Iterable[str] | None = None,
        *,
        maps: bool = False,
        curve: CurveClientKeys | None = None,
        context: zmq.Context | None = None,
        hwm: int = 10000,
    ):
        self.cameras = None if cameras is None else set(cameras)
        self.maps = maps
        self.missed = self.resets = self.malformed = 0
        self.missed_by_camera: dict[str, int] = {}
        self.resets_by_camera: dict[str, int] = {}
        self._last_seq: dict[str, tuple] = {}  # camera -> (seq_epoch, seq)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        if curve is not None:
            curve.apply(self._sock)
        for topic in [""] if self.cameras is None else sorted(self.cameras):
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(endpoint)
        self._unpacker = dict(
            raw=False, max_str_len=1 << 20, max_bin_len=64 << 20, max_array_len=1 << 16, max_map_len=1 << 10
        )

    def wait_connected(self, timeout_s: float = 5.0) -> bool:
        """True once the connection to the daemon is up (its handshake done: the subscriptions are sent right
        after it), False after ``timeout_s``. ZeroMQ delivers no record published before a subscription
        reaches the daemon: wait for this before sending frames whose records must all arrive."""
        if self._monitor is None:
            return True
        if not self._monitor.poll(int(timeout_s * 1000)):
            return False
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._monitor = None
        return True

    def _wanted(self, topic: str) -> bool:
        camera, _, suffix = topic.partition("/")
        if suffix and (suffix != "map" or not self.maps):
            return False
        return self.cameras is None or camera in self.cameras

    def recv(self, timeout_s: float = 1.0) -> Verdict | AnomalyMap | None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                return None
            parts = self._sock.recv_multipart()
            topic = parts[0].decode(errors="replace")
            if not self._wanted(topic):
                continue
            item = self._parse(topic, parts)
            if item is None:
                self.malformed += 1
                continue
            if isinstance(item, Verdict):
                self._count_gap(item)
            return item

    def _parse(self, topic: str, parts: list[bytes]) -> Verdict | AnomalyMap | None:
        """The item a [topic, msgpack body] message carries, or None when it does not follow the protocol."""
        if len(parts) != 2:
            return None
        try:
            body = msgpack.unpackb(parts[1], **self._unpacker)
            if not isinstance(body, dict):
                return None
            if topic.endswith("/map"):
                return AnomalyMap.from_message(topic[:-4], body)
            verdict = Verdict.from_record(body)
        except (KeyError, TypeError, ValueError):
            return None
        return verdict if verdict.camera_id == topic else None

    def _count_gap(self, verdict: Verdict) -> None:
        if not isinstance(verdict.seq, int):
            return  # a daemon without sequence numbers
        cam = verdict.camera_id
        last = self._last_seq.get(cam)
        self._last_seq[cam] = (verdict.seq_epoch, verdict.seq)
        if last is None:
            return  # the first record seen from this camera: nothing to compare with
        if verdict.seq_epoch != last[0]:  # a new numbering: records 0 .. seq-1 of it were missed
            self.resets += 1
            self.resets_by_camera[cam] = self.resets_by_camera.get(cam, 0) + 1
            gap = verdict.seq
        else:
            gap = verdict.seq - last[1] - 1
        if gap > 0:
            self.missed += gap
            self.missed_by_camera[cam] = self.missed_by_camera.get(cam, 0) + gap

    def __iter__(self) -> Iterator[Verdict | AnomalyMap]:
        while True:
            item = self.recv(1.0)
            if item is not None:
                yield item

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> VerdictSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
