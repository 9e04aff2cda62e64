"""Metrics: registry, aggregation over child snapshots (incl. restarts), Prometheus text over HTTP."""

from __future__ import annotations

import msgpack
import pytest
from daemon_helpers import parse_metrics, scrape

from edge_daemon.metrics import Aggregator, Metrics, MetricsServer, render


def _child(received: int, depth: int) -> dict:
    m = Metrics()
    m.inc("edge_frames_received_total", {"camera": "cam1"}, received)
    m.set("edge_queue_depth", depth)
    for value in (1.0, 3.0, 700.0):
        m.observe("edge_stage_latency_ms", value, {"stage": "infer"})
    return msgpack.unpackb(msgpack.packb(m.snapshot()), raw=False)  # as it travels


def test_histogram_and_render():
    m = Metrics()
    for value in (0.1, 0.5, 2, 2000, 10**6):
        m.observe("edge_stage_latency_ms", value, {"stage": "tile"})
    text = render(m)
    values = parse_metrics(text)
    assert values['edge_stage_latency_ms_bucket{stage="tile",le="0.5"}'] == 2
    assert values['edge_stage_latency_ms_bucket{stage="tile",le="2"}'] == 3
    assert values['edge_stage_latency_ms_bucket{stage="tile",le="+Inf"}'] == 5
    assert values['edge_stage_latency_ms_count{stage="tile"}'] == 5
    assert values['edge_stage_latency_ms_sum{stage="tile"}'] == pytest.approx(0.6 + 2002 + 10**6)
    assert "# TYPE edge_stage_latency_ms histogram" in text


def test_aggregation_keeps_counters_of_dead_children():
    agg = Aggregator()
    agg.update("worker-0-g1", _child(5, 3))
    agg.update("worker-0-g2", _child(2, 1))
    agg.mark_dead("worker-0-g1")
    totals = agg.totals()
    assert agg.counter("edge_frames_received_total") == 7
    assert agg.counter("edge_frames_received_total", {"camera": "cam1"}) == 7
    assert totals.gauges[("edge_queue_depth", ())] == 1  # gauges from live children only
    hist = totals.hists[("edge_stage_latency_ms", (("stage", "infer"),))]
    assert hist[3] == 6 and hist[2] == pytest.approx(2 * 704.0)


def test_label_escaping():
    m = Metrics()
    m.inc("edge_frames_received_total", {"camera": 'we"ird\\cam'})
    assert 'camera="we\\"ird\\\\cam"' in render(m)


def test_http_scrape():
    agg = Aggregator()
    agg.update("ingest", _child(4, 2))
    healthy = {"ok": True}
    server = MetricsServer(agg, "127.0.0.1", 0, lambda: healthy["ok"]).start()
    try:
        status, text = scrape(server.port)
        assert status == 200
        assert parse_metrics(text)['edge_frames_received_total{camera="cam1"}'] == 4
        assert scrape(server.port, "/healthz")[0] == 200
        healthy["ok"] = False
        assert scrape(server.port, "/healthz")[0] == 503
        assert scrape(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_declared_counters_render_at_zero_and_sum_with_events():
    m = Metrics()
    m.declare("edge_protocol_errors_total", [{"reason": "parts"}, {"reason": "header"}])
    m.declare("edge_protocol_errors_total", [{"reason": "parts"}])  # declaring again changes nothing
    m.inc("edge_protocol_errors_total", {"reason": "parts"})
    values = parse_metrics(render(m))
    assert values['edge_protocol_errors_total{reason="parts"}'] == 1
    assert values['edge_protocol_errors_total{reason="header"}'] == 0
    agg = Aggregator()
    agg.local.declare("edge_worker_restarts_total", [{"worker": "0"}])
    assert parse_metrics(render(agg.totals()))['edge_worker_restarts_total{worker="0"}'] == 0
