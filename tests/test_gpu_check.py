"""benchmarks/gpu_check: the no-GPU path (exit 77, one message), and every section's logic on the CPU with
tiny settings (CPU engines stand in for the CUDA ones; timings taken here mean nothing and are not kept)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_check, gpu_check_report, gpu_check_sections
from edge_daemon.bench.pipeline import StandInEngine
from engines import open_engine
from inspection.pipeline import InspectConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_script_without_a_gpu_says_so_and_exits_77(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 77
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no usable NVIDIA GPU" in lines[0] and "nothing was run" in lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--skip", "everything"])
    assert exc.value.code == gpu_check.EXIT_USAGE


def test_gpu_without_numpy_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: ({"name": "FakeGPU"}, None))
    monkeypatch.setattr(gpu_check, "missing", lambda names: ["numpy"])
    assert gpu_check.main(["--out", "unused"]) == gpu_check.EXIT_NO_NUMPY
    assert "numpy is not installed" in capsys.readouterr().out


def test_environment_names_missing_modules_and_cpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "missing", lambda names: ["zmq", "tensorrt"])
    env = gpu_check.environment({"name": "FakeGPU"})
    assert set(env["missing"]) == {"zmq", "tensorrt"} and env["cpu"]["cores"] >= 1
    assert isinstance(env["cpu"]["isa"], list)


def test_budget_and_exit_code():
    now = [0.0]
    budget = gpu_check.Budget(100.0, clock=lambda: now[0])
    now[0] = 30.0
    assert budget.left() == 70.0 and budget.spent() == 30.0
    now[0] = 500.0
    assert budget.left() == 0.0
    ok = {"sections": {"env": {"status": "ok"}, "tests": {"status": "skipped"}}}
    assert gpu_check.exit_code(ok) == 0
    for bad in ("failed", "error"):
        assert gpu_check.exit_code({"sections": {"x": {"status": bad}}}) == 1


def test_guarded_turns_a_crash_into_an_error_entry():
    def crash(*_):
        raise RuntimeError("boom")

    entry = gpu_check_sections.guarded(crash, None, None, {}, Path("."))
    assert entry["status"] == "error" and "boom" in entry["reason"] and entry["traceback"]


def test_compare_counts_flips_away_from_the_threshold_and_nonfinite():
    m = np.zeros((4, 4))
    ref = {"a": (0.2, "PASS", m), "b": (0.9, "FAIL", m), "c": (0.5004, "FAIL", m), "d": (0.1, "PASS", m)}
    other = {"a": (0.21, "PASS", m), "b": (0.4, "PASS", m + 0.5), "c": (0.4996, "PASS", m),
             "d": (math.inf, "FAIL", m)}
    row = gpu_check_sections.compare(ref, other, threshold=0.5)
    assert row["nonfinite_scores"] == 1 and row["verdict_flips"] == ["b", "c", "d"]
    assert row["flips_near_threshold"] == ["c"] and not row["verdicts_equal_away_from_threshold"]
    assert row["max_map_diff"] == pytest.approx(0.5)
    assert row["max_score_diff_rel"] == pytest.approx(0.5 / 0.8)


def test_parity_frames_cover_good_defect_and_ood():
    frames = gpu_check_sections.parity_frames(64, 3)
    assert {n.split("-")[0] for n in frames} == {"good", "scratch", "spot", "ood"}
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames.values())
    assert gpu_check_sections.parity_frames(64, 1)["ood-saturated"].shape == (64, 64)


def _cpu_opener(path, *_args, **_kw):
    return open_engine(path, backend="torch", device="cpu", max_batch=8, threads=1)


def test_parity_for_bundle_runs_end_to_end(tiny_bundle):
    row = gpu_check_sections.parity_for_bundle(str(tiny_bundle), _cpu_opener, ("fp32", "same"), frame_size=64,
                                               config=InspectConfig(tile_overlap=8))
    same = row["vs_fp32"]["same"]
    assert same["frames"] == 12 and same["nonfinite_scores"] == 0 and same["verdict_flips"] == []
    assert same["max_map_diff"] == 0.0 and set(row["ood_verdicts_same"]) == {
        "ood-saturated", "ood-dark", "ood-inverted", "ood-noise", "ood-checkerboard"}


def test_time_engine_and_throughput_rows(tiny_bundle):
    row = gpu_check_sections.time_engine(StandInEngine(tile=32, streams=2, max_batch=4),
                                         np.zeros((4, 32, 32, 1), np.uint8), seconds=0.02)
    assert row["batch"] == 4 and row["batches"] >= 3 and row["tiles_per_s"] > 0 and row["ms_p99"] >= 0
    rows = gpu_check_sections.throughput_rows(str(tiny_bundle), lambda p, s, b, **kw: open_engine(
        p, backend="torch", device="cpu", streams=s, max_batch=b, threads=1), (1, 2), (1, 2), 0.01,
        lambda: 1e9)
    assert len(rows) == len(gpu_check_sections.MODES) * 2 * 2
    assert {r["mode"] for r in rows} == set(gpu_check_sections.MODES)
    assert all(r["gpu_mib"] is None for r in rows)
    assert gpu_check_sections.throughput_rows(str(tiny_bundle), None, (1,), (1,), 0.01, lambda: 0.0) == []


def test_given_bundles_reads_good_ones_and_rejects_corrupt(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "good")
    shutil.copytree(tiny_bundle, tmp_path / "bad")
    with open(tmp_path / "bad" / "model.onnx", "ab") as fh:
        fh.write(b"x")
    result = gpu_check_sections.given_bundles(tmp_path)
    assert result["status"] == "ok" and list(result["bundles"]) == ["good"]
    assert "sha256" in result["rejected"]["bad"]
    assert gpu_check_sections.given_bundles(tmp_path / "good")["status"] == "failed"


def test_latency_config_is_a_valid_daemon_config(tiny_bundle, tmp_path):
    from edge_daemon.config import load_config

    path = gpu_check_sections.latency_config(str(tiny_bundle), tmp_path / "daemon.yaml")
    cfg = load_config(path)
    assert cfg.engine.backend == "torch" and cfg.engine.precision == "fp16" and cfg.engine.device == "cuda:0"
    assert cfg.max_frame.width == 4096


def test_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase name="t_ok"/><testcase name="t_bad"><failure message="boom"/></testcase>'
                   '<testcase name="t_skip"><skipped/></testcase></testsuite></testsuites>')
    counts = gpu_check_sections._junit_counts(xml)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["t_bad: boom"]}


def _sample_report():
    env = {"status": "ok", "python": "3.11", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0",
           "memory_gib": 139.8, "count": 1, "torch": "2.13.0", "cuda": "13.0", "cudnn": 91000},
           "cpu": {"model": "Some CPU", "cores": 16, "isa": ["avx2", "avx512f"]},
           "load_average": [0.1, 0.1, 0.1],
           "missing": {"zmq": "latency"}, "started": "now"}
    same = {"a": (0.2, "PASS", np.zeros(2))}
    parity_row = gpu_check_sections.compare(same, same, 0.5)
    return {"budget_s": 480, "elapsed_s": 300.0, "sections": {
        "env": env, "bundles": {"status": "ok", "source": "trained here", "bundles": {"efficientad-s": "x"}},
        "tests": {"status": "failed", "tests": 10, "failures": 1, "errors": 0, "skipped": 2,
                  "failed": ["test_x: boom"], "missing_modules": ["tensorrt"]},
        "parity": {"status": "ok", "bundles": {"efficientad-s": {"vs_fp32": {"fp16": parity_row}}}},
        "throughput": {"status": "ok", "tiles": "on the GPU", "bundles": {"efficientad-s": [
            {"mode": "fp16", "streams": 2, "batch": 8, "tiles_per_s": 1234.5, "ms_p50": 6.1, "ms_p99": 7.2,
             "gpu_mib": 900.0}]}},
        "latency": {"status": "skipped", "reason": "the daemon needs zmq (not installed)"}}}


def test_markdown_report_has_machine_lines_and_tables():
    text = gpu_check_report.markdown(_sample_report())
    assert text.startswith("# GPU check") and "NVIDIA H200" in text and "Some CPU" in text
    assert "| efficientad-s | fp16 | 2 | 8 | 1234 | 6.10 | 7.20 | 900 |" in text
    assert "| efficientad-s | fp16 | 1 | 0 |" in text  # parity row
    assert "FAILED test_x: boom" in text and "| latency | skipped |" in text
    throughput = text.split("## Throughput")[1]
    assert "CPU: Some CPU" in throughput.split("|")[0]  # CPU model + ISA printed beside the timings
    report = _sample_report()
    report["sections"]["latency"] = {"status": "ok", "bundle": "efficientad-s", "engine": "torch",
                                     "runs": {"2048x2048": {**_sample_latency()}}}
    row = "| 2048x2048 | 5.0 | 40 | 40 | 0 | 12.0 | 20.0 | 7.0 | 13.0 | 4.0 | ok |"
    assert row in gpu_check_report.markdown(report)
    json.dumps(report, default=str)  # the JSON side serialises


def _sample_latency():
    return {"offered_fps": 5.0, "sent": 40, "answered": 40, "drops": 0, "errors": 0, "unanswered": 0,
            "throughput_fps": 5.0, "latency_ms": {"p50": 12.0, "p99": 20.0},
            "stages_ms": {"infer": {"p50": 4.0, "p99": 6.0}}, "engine_own_ms": {"p50": 5.0, "p99": 7.0},
            "ceiling_fps": 80.0, "added_p99_ms": 13.0, "tiles_per_frame": 81, "status": "ok"}


def test_latency_summary_reads_an_edge_bench_result():
    result = {"steps": [{"offered_fps": 5.0, "sent": 40, "answered": 40, "drops": 0, "errors": 0,
                         "unanswered": 0, "throughput_fps": 4.9, "latency_ms": {"p50": 1.0, "p99": 2.0},
                         "stages_ms": {}, "added_p99_ms": 0.5}],
              "ceiling": {"own_ms": {"p99": 1.5}, "ceiling_fps": 100.0, "tiles_per_frame": 81}}
    summary = gpu_check_sections.latency_summary(result)
    assert summary["added_p99_ms"] == 0.5 and summary["tiles_per_frame"] == 81 and summary["answered"] == 40


@pytest.mark.slow
def test_run_tests_section_on_this_machine(tmp_path):
    """The real pytest subprocess and junit parsing; without CUDA every gpu_only test skips."""
    section = gpu_check_sections.run_tests(None, gpu_check.Budget(600), {}, tmp_path)
    assert section["tests"] > 0 and section["failures"] == 0 and section["errors"] == 0
    if not torch.cuda.is_available():
        assert section["status"] == "ok" and section["skipped"] == section["tests"]


@pytest.mark.slow
def test_train_one_tiny_bundle(tmp_path):
    """edge-train through the section's own command (DFR, 64 px tiles, 2 steps)."""
    result = gpu_check_sections.train_bundles(tmp_path, lambda: 1e9, quick=True, kinds=("dfr-s",), tile=64)
    assert result["status"] == "ok", result
    from engines.bundle import read_bundle

    assert read_bundle(result["bundles"]["dfr-s"]).kind == "dfr"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_orchestration_writes_json_and_markdown_and_reports_crashes(tiny_bundle, tmp_path, monkeypatch):
    """A pretend GPU: the sections that open CUDA engines fail here, are recorded as errors, exit 1."""
    fake_gpu = {"name": "PretendGPU", "compute_capability": "9.0", "memory_gib": 1.0, "count": 1,
                "torch": torch.__version__, "cuda": None, "cudnn": None}
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: (fake_gpu, None))
    shutil.copytree(tiny_bundle, tmp_path / "bundles" / "tiny")
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--bundles", str(tmp_path / "bundles"), "--quick",
                           "--skip", "tests", "latency"])
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert code == 1 and sections["bundles"]["status"] == "ok" and sections["tests"]["status"] == "skipped"
    assert sections["parity"]["status"] == "error" and "CUDA" in sections["parity"]["reason"]
    assert sections["throughput"]["status"] == "error"
    assert "PretendGPU" in (out / "gpu_check.md").read_text()
