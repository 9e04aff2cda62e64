"""Metrics: counters, gauges and histograms in each process, aggregated by the supervisor and served in
the Prometheus text format over HTTP (``/metrics``; ``/healthz`` answers 200 or 503).

Children keep a ``Metrics`` registry and send ``snapshot()`` (cumulative, msgpack-safe) every half second
on the supervisor's stats socket; the ``Aggregator`` keeps the latest snapshot per child generation and
sums them, so counters of a restarted child are not lost. Gauges count only from live children.

Labels: ``camera`` follows the one policy of cameras.py (configured ids, ``_other``, ``unknown``: decided
from the config, the same in every process, so received = answered + failed + dropped holds per label);
every counter is declared at 0 for each label value it can take (``Metrics.declare``), so a series exists
before its first event.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = [
    "Metrics",
    "Aggregator",
    "MetricsServer",
    "render",
    "HELP",
    "LATENCY_BUCKETS_MS",
    "BATCH_BUCKETS",
]

LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

HELP = {
    "edge_frames_received_total": (
        "counter",
        "Frame messages that reached ingest (good or bad), per camera label.",
    ),
    "edge_frames_answered_total": ("counter", "Verdict records published, per camera label."),
    "edge_frames_failed_total": (
        "counter",
        "Error records published (protocol, decode, inference, worker lost), per camera label.",
    ),
    "edge_frames_dropped_total": ("counter", "Drop records published (backpressure), per camera label."),
    "edge_protocol_errors_total": ("counter", "Messages refused by ingest, per reason class."),
    "edge_transport_events_total": (
        "counter",
        "Connection events of ingest's camera sockets (a message part over the hard size limit costs the "
        "connection: one disconnect).",
    ),
    "edge_records_deduplicated_total": (
        "counter",
        "Second records for one frame (worker lost after publishing), per camera label.",
    ),
    "edge_worker_restarts_total": ("counter", "Inference workers restarted by the supervisor."),
    "edge_queue_depth": ("gauge", "Frames waiting for a worker."),
    "edge_slots_in_use": ("gauge", "Shared-memory slots holding a frame."),
    "edge_inflight_frames": ("gauge", "Frames handed to workers and not yet answered."),
    "edge_workers_healthy": ("gauge", "Inference workers alive and reporting."),
    "edge_gpu_memory_bytes": ("gauge", "GPU memory allocated by a worker's engine (torch backends)."),
    "edge_batch_size": ("histogram", "Tiles per engine call."),
    "edge_stage_latency_ms": ("histogram", "Per-stage latency of a frame (ms)."),
    "edge_frame_latency_ms": ("histogram", "Receive-to-result latency of a frame in the worker (ms)."),
}


def _key(name: str, labels: dict | None) -> tuple:
    return (name, tuple(sorted((labels or {}).items())))


class Metrics:
    """One process's registry. Not thread-safe: one thread updates it."""

    def __init__(self):
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        self.hists: dict[tuple, list] = {}  # key -> [bounds, counts (len bounds + 1), sum, count]

    def declare(self, name: str, label_sets: Iterable[dict | None] = (None,)) -> None:
        """Counters at 0 for each label set (present in /metrics before their first event)."""
        for labels in label_sets:
            self.counters.setdefault(_key(name, labels), 0)

    def inc(self, name: str, labels: dict | None = None, value: float = 1) -> None:
        key = _key(name, labels)
        self.counters[key] = self.counters.get(key, 0) + value

    def set(self, name: str, value: float, labels: dict | None = None) -> None:
        self.gauges[_key(name, labels)] = value

    def observe(
        self, name: str, value: float, labels: dict | None = None, buckets=LATENCY_BUCKETS_MS
    ) -> None:
        key = _key(name, labels)
        hist = self.hists.get(key)
        if hist is None:
            hist = self.hists[key] = [list(buckets), [0] * (len(buckets) + 1), 0.0, 0]
        hist[1][bisect.bisect_left(hist[0], value)] += 1
        hist[2] += float(value)
        hist[3] += 1

    def snapshot(self) -> dict:
        return {
            "counters": [[n, dict(l), v] for (n, l), v in self.counters.items()],
            "gauges": [[n, dict(l), v] for (n, l), v in self.gauges.items()],
            "hists": [[n, dict(l), h[0], h[1], h[2], h[3]] for (n, l), h in self.hists.items()],
        }


class Aggregator:
    """Latest snapshot per source (child role, index, generation); thread-safe reads for the HTTP thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._snapshots: dict[str, dict] = {}
        self._live: set[str] = set()
        self.local = Metrics()  # the supervisor's own figures

    def update(self, source: str, snapshot: dict) -> None:
        with self._lock:
            self._snapshots[source] = snapshot
            self._live.add(source)

    def reported(self, source: str) -> bool:
        """Whether ``source`` has sent at least one snapshot (its counters are on the page)."""
        with self._lock:
            return source in self._snapshots

    def mark_dead(self, source: str) -> None:
        with self._lock:
            self._live.discard(source)

    def totals(self) -> Metrics:
        out = Metrics()
        with self._lock:
            items = list(self._snapshots.items()) + [("supervisor", self.local.snapshot())]
            live = set(self._live) | {"supervisor"}
        for source, snap in items:
            for name, labels, value in snap.get("counters", []):
                out.inc(name, labels, value)
            if source in live:
                for name, labels, value in snap.get("gauges", []):
                    key = _key(name, labels)
                    out.gauges[key] = out.gauges.get(key, 0) + value
            for name, labels, bounds, counts, total, count in snap.get("hists", []):
                hist = out.hists.setdefault(_key(name, labels), [list(bounds), [0] * len(counts), 0.0, 0])
                hist[1] = [a + b for a, b in zip(hist[1], counts, strict=True)]
                hist[2] += total
                hist[3] += count
        return out

    def counter(self, name: str, labels: dict | None = None) -> float:
        """Sum of a counter over every label set that contains ``labels``."""
        want = set((labels or {}).items())
        return sum(v for (n, l), v in self.totals().counters.items() if n == name and want <= set(l))


def _labels(labels: tuple, extra: dict | None = None) -> str:
    items = list(labels) + list((extra or {}).items())
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in items)
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(metrics: Metrics) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    families: dict[str, list[str]] = {}
    for (name, labels), value in sorted(metrics.counters.items()) + sorted(metrics.gauges.items()):
        families.setdefault(name, []).append(f"{name}{_labels(labels)} {_fmt(value)}")
    for (name, labels), (bounds, counts, total, count) in sorted(metrics.hists.items()):
        rows = families.setdefault(name, [])
        running = 0
        for bound, c in zip(list(bounds) + ["+Inf"], counts, strict=True):
            running += c
            rows.append(
                f"{name}_bucket{_labels(labels, {'le': bound if bound == '+Inf' else _fmt(bound)})} {running}"
            )
        rows.append(f"{name}_sum{_labels(labels)} {_fmt(total)}")
        rows.append(f"{name}_count{_labels(labels)} {count}")
    for name in sorted(families):
        kind, text = HELP.get(name, ("untyped", name))
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *families[name]]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a ThreadingHTTPServer in a daemon thread."""

    def __init__(self, aggregator: Aggregator, host: str, port: int, healthy=lambda: True):
        agg = aggregator

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                if self.path.split("?")[0] == "/metrics":
                    body, code, ctype = render(agg.totals()).encode(), 200, "text/plain; version=0.0.4"
                elif self.path == "/healthz":
                    ok = healthy()
                    body, code, ctype = (
                        (b"ok\n" if ok else b"unhealthy\n"),
                        (200 if ok else 503),
                        "text/plain",
                    )
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no per-request log lines
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)
