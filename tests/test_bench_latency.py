"""edge-bench latency: accounting and knee maths (pure), the benchmark config, and a short real run against
the daemon with the tiny bundle (the CI smoke test: accounting only, never timings)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from edge_daemon.bench import cli as bench_cli
from edge_daemon.bench.latency import (
    _add_ratios,
    find_knee,
    parse_resolution,
    run,
    stage_stats,
    step_stats,
    sweep_rates,
)
from edge_daemon.bench.loadgen import CameraReport, Receipt, bench_config, latency_stats, synthetic_frames
from edge_daemon.config import config_from_mapping


def _receipt(cam, fid, kind="verdict", capture_ms=0.0, latency_ms=10.0, total_ms=None):
    timings = {} if total_ms is None else {"total": total_ms, "infer": total_ms / 2}
    cap = int(capture_ms * 1e6)
    return Receipt(cam, fid, kind, cap + int(latency_ms * 1e6), cap, "PASS" if kind == "verdict" else None,
                   timings_ms=timings)


def _report(cam, sent, refused=()):
    return CameraReport(cam, tuple(sent), tuple(refused), 0.0, 0.0, 0.0)


def test_step_stats_accounts_every_sent_frame():
    reports = [_report("a", range(5), refused=[5]), _report("b", range(3))]
    receipts = [_receipt("a", i, capture_ms=100 * i) for i in range(3)]  # a: 0..2 answered
    receipts += [_receipt("a", 3, "drop"), _receipt("b", 0, "error"), _receipt("b", 1)]
    receipts += [_receipt("a", 0)]  # a duplicate
    receipts += [_receipt("a", 99), _receipt("warmup", 0)]  # not sent in this step: ignored
    s = step_stats(reports, receipts, fps=10.0, duration_s=1.0)
    assert s["sent"] == 8 and s["refused"] == 1
    assert (s["answered"], s["drops"], s["errors"]) == (4, 1, 1)
    assert s["unanswered"] == 2  # a/4 and b/2
    assert s["answered"] + s["drops"] + s["errors"] + s["unanswered"] == s["sent"]
    assert s["duplicates"] == 1
    assert s["offered_fps"] == 20.0
    assert s["latency_ms"]["p50"] == pytest.approx(10.0)


def test_step_stats_throughput_and_stages():
    reports = [_report("a", range(11))]
    receipts = [_receipt("a", i, capture_ms=100.0 * i, latency_ms=20.0, total_ms=15.0) for i in range(11)]
    s = step_stats(reports, receipts, fps=10.0, duration_s=1.0)
    # 11 verdicts between the first capture (0 ms) and the last receipt (1020 ms)
    assert s["throughput_fps"] == pytest.approx(11 / 1.02)
    assert s["stages_ms"]["total"]["p50"] == pytest.approx(15.0)
    assert s["stages_ms"]["outside"]["p99"] == pytest.approx(5.0)


def test_step_stats_without_records():
    s = step_stats([_report("a", range(3))], [], fps=1.0, duration_s=3.0)
    assert s["unanswered"] == 3 and s["throughput_fps"] is None and s["latency_ms"]["p99"] is None


def test_latency_stats_percentiles():
    s = latency_stats(range(1, 101))
    assert s["max"] == 100 and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert latency_stats([None, None])["p50"] is None


def test_stage_stats_skips_missing_stages():
    out = stage_stats([_receipt("a", 0, latency_ms=5.0)])
    assert out == {}


def _step(offered, p99, drops=0):
    return {"offered_fps": offered, "throughput_fps": offered, "latency_ms": {"p99": p99}, "drops": drops,
            "errors": 0, "unanswered": 0, "refused": 0}


def test_find_knee():
    steps = [_step(1, 10), _step(2, 20), _step(4, 90), _step(8, 30)]
    knee = find_knee(steps, budget_ms=50)
    assert knee["knee_offered_fps"] == 2 and knee["first_over_offered_fps"] == 4
    assert find_knee([_step(1, 10, drops=1)], 50)["knee_offered_fps"] is None
    assert find_knee([_step(1, 10)], 50)["first_over_offered_fps"] is None


def test_sweep_rates_and_resolution():
    assert sweep_rates(2.0, 2.0, 3) == [2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="factor > 1"):
        sweep_rates(1.0, 1.0, 3)
    assert parse_resolution("640x480") == (640, 480)
    with pytest.raises(argparse.ArgumentTypeError, match="WxH"):
        parse_resolution("640")


def test_synthetic_frames_are_textured():
    frames = synthetic_frames(64, 48, count=2, seed=1)
    assert frames.shape == (2, 48, 64) and frames.dtype.name == "uint8"
    assert frames[0].std() > 10 and not (frames[0] == frames[1]).all()


def test_bench_config_is_valid_and_local(tmp_path, tiny_bundle):
    base = {"engine": {"bundle": "rel/bundle", "backend": "onnxruntime"},
            "endpoints": {"ingest": "tcp://*:5555", "imagezmq": "tcp://*:5557"},
            "max_frame": {"width": 100, "height": 4000, "channels": 3},
            "cameras": [{"id": "cam1", "threshold": 2.0}]}
    path, data = bench_config(base, tmp_path, ["cam0", "cam1"], (640, 480), bundle=str(tiny_bundle))
    assert yaml.safe_load(path.read_text()) == data
    cfg = config_from_mapping(data)
    assert cfg.engine.bundle == str(tiny_bundle)
    assert cfg.endpoints.ingest.startswith("tcp://127.0.0.1:") and cfg.endpoints.imagezmq is None
    assert (cfg.max_frame.width, cfg.max_frame.height, cfg.max_frame.channels) == (640, 4000, 3)
    assert [c.id for c in cfg.cameras] == ["cam0", "cam1"] and cfg.camera("cam1").threshold == 2.0
    _, relative = bench_config(base, tmp_path / "b", ["c"], (8, 8), base_dir=tmp_path)
    assert relative["engine"]["bundle"] == str((tmp_path / "rel/bundle").resolve())


def test_latency_parser_registered(tmp_path, capsys):
    args = bench_cli.build_parser().parse_args(["latency", "--config", "x.yaml", "--resolution", "64x32"])
    assert args.resolution == (64, 32) and args.func is run
    assert args.mode is None and args.transport is None  # the config's mode, tcp
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"engine": {"bundle": str(tmp_path)}}))
    code = bench_cli.main(["latency", "--config", str(config), "--attach", "--mode", "single"])
    assert code == 2 and "with --attach the running daemon's config decides" in capsys.readouterr().err


# multi over tcp and single over ipc: test_daemon_integration (and every other daemon test for multi/tcp)
@pytest.mark.parametrize("mode, transport", [("multi", "ipc"), ("single", "tcp")])
def test_latency_smoke_against_the_daemon(tmp_path, tiny_bundle, capsys, mode, transport):
    """Two camera processes, 1 s of load on the real daemon: every sent frame gets exactly one record; the
    run names its machine and load, and reports the added latency (never asserted: timings)."""
    pytest.importorskip("onnxruntime")
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"bundle": str(tiny_bundle), "backend": "onnxruntime", "max_batch": 8, "threads": 1},
        "queue": {"slots": 24, "size": 16, "worker_credit": 4},
        "inspection": {"tile_overlap": 0},
        "log_level": "WARNING",
    }))
    out_json, out_png = tmp_path / "lat.json", tmp_path / "lat.png"
    code = bench_cli.main(["latency", "--config", str(config), "--cameras", "2", "--fps", "10",
                           "--resolution", "96x64", "--duration", "1", "--ceiling-seconds", "0.3",
                           "--grace", "20", "--workdir", str(tmp_path / "work"), "--json", str(out_json),
                           "--png", str(out_png), "--mode", mode, "--transport", transport])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out_json.read_text())
    (step,) = result["steps"]
    assert step["sent"] + step["refused"] == 20
    assert step["answered"] + step["drops"] + step["errors"] + step["unanswered"] == step["sent"]
    assert step["unanswered"] == 0 and step["duplicates"] == 0 and step["camera_errors"] == []
    assert step["errors"] == 0
    assert len(step["samples"]) == step["sent"]
    assert set(step["stages_ms"]) >= {"queue", "infer", "total", "outside"}
    assert result["ceiling"]["tiles_per_frame"] == 6  # 96x64 frame, 32 px tiles, no overlap
    assert result["ceiling"]["ceiling_fps"] > 0 and result["ceiling"]["own_ms"]["p50"] > 0
    assert result["daemon_exit_code"] == 0
    assert out_png.stat().st_size > 1000
    assert "offered/s" in printed
    assert result["process_mode"] == mode and result["transport"] == transport
    daemon_cfg = yaml.safe_load((tmp_path / "work" / "daemon.yaml").read_text())
    assert daemon_cfg["process_mode"] == mode and daemon_cfg["endpoints"]["ingest"].startswith(f"{transport}://")
    for key in ("machine_before", "machine_after"):
        assert set(result[key]) == {"cpu", "isa", "cpus", "load_average"} and result[key]["cpu"]
    assert printed.count("load average (1/5/15 min)") == 2 and "machine: " in printed
    assert {"added_p50_ms", "added_p99_ms"} <= set(step)
    assert "added latency (end-to-end minus the engine's own one-frame time): p50" in printed


def test_machine_info_reads_cpuinfo():
    from edge_daemon.bench.machine import cpu_model, isa_features, machine_line

    text = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx2 avx512f amx_tile x\n"
    assert cpu_model(text) == "Test CPU 9000"
    assert isa_features(text) == ["sse4_2", "avx2", "avx512f", "amx_tile"]
    assert isa_features("") == [] and cpu_model("") != ""
    line = machine_line({"cpu": "C", "isa": ["avx2"], "cpus": 2, "load_average": (0.5, 1.0, 2.0)})
    assert line == "machine: C, 2 logical CPUs, ISA avx2; load average (1/5/15 min) 0.50 / 1.00 / 2.00"


def test_added_latency_is_end_to_end_minus_the_less_disturbed_own_time():
    step = {"throughput_fps": 2.0, "offered_fps": 2.0, "drops": 0, "latency_ms": {"p50": 12.0, "p99": 20.0}}
    before = {"ceiling_fps": 5.0, "own_ms": {"p50": 11.0, "p99": 19.0}}
    after = {"ceiling_fps": 4.0, "own_ms": {"p50": 10.5, "p99": 18.5}}
    result = {"steps": [step], "workers": 1, "ceiling": before, "ceiling_before": before,
              "ceiling_after": after}
    _add_ratios(result)
    assert result["own_ms"] == {"p50": 10.5, "p99": 18.5}
    assert step["added_p50_ms"] == pytest.approx(1.5) and step["added_p99_ms"] == pytest.approx(1.5)
    assert step["ratio_to_ceiling"] == pytest.approx(0.4) and not step["saturated"]


def test_pipeline_bench_names_its_machine(capsys):
    code = bench_cli.main(["pipeline", "--sizes", "96x64", "--tile", "32", "--overlap", "0", "--repeat", "2",
                           "--cpu-only"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("machine: ") and "load average" in out
    assert "96x64" in out  # one row of timings (never asserted: the machine is shared)
