"""`edge-engines` and `edge-bench engine` command lines."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_daemon.bench import cli as bench_cli
from engines import cli
from engines.registry import tensorrt_missing_reason


def test_check_verifies_bundle_and_runs_onnxruntime(tiny_bundle, tmp_path, capsys):
    rc = cli.main(["check", "--bundle", str(tiny_bundle), "--cache", str(tmp_path)])
    status = json.loads(capsys.readouterr().out)
    assert status["bundle_ok"] and status["onnxruntime_ok"] and status["map_shape"] == [8, 8]
    if tensorrt_missing_reason() is not None:
        assert rc == 0 and status["engine"] is None and "tensorrt" in status["reason"]
    else:
        assert rc in (0, 2)


def test_check_rejects_a_corrupt_bundle(tiny_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"x")
    assert cli.main(["check", "--bundle", str(copy)]) == 1
    assert "sha256" in capsys.readouterr().err


def test_build_without_tensorrt_exits_2_with_reason(tiny_bundle, tmp_path, capsys):
    if tensorrt_missing_reason() is None:
        pytest.skip("TensorRT usable here: `build` would really build")
    assert cli.main(["build", "--bundle", str(tiny_bundle), "--cache", str(tmp_path)]) == 2
    assert "tensorrt" in capsys.readouterr().err


def test_bench_engine_prints_and_writes_figures(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_cli.main(["engine", "--bundle", str(tiny_bundle), "--backend", "onnxruntime", "--batch", "1,2",
                         "--seconds", "0.05", "--min-iters", "2", "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiles/s" in text and "vs eager" in text
    report = json.loads(out.read_text())
    assert report["engine"] == "onnxruntime/cpu/fp32"
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["batches"] >= 2 and row["tiles_per_s"] > 0 and row["ms_p99"] >= row["ms_p50"] > 0
        assert row["eager"]["tiles_per_s"] > 0 and row["speedup"] > 0
