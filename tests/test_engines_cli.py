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
    assert cli.main(["check", "--bundle", str(copy)]) == 2  # bad input: the same code as edge-daemon's
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "fix:" in err[0], err


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
    assert text.startswith("cpu: ") and "ISA: " in text.splitlines()[0]
    assert "tiles/s" in text and "vs eager" in text
    report = json.loads(out.read_text())
    assert report["cpu"]["model"] and isinstance(report["cpu"]["isa"], list) and report["threads"] == 1
    (engine,) = report["engines"]
    assert engine["engine"] == "onnxruntime/cpu/fp32"
    assert [r["batch"] for r in engine["results"]] == [1, 2]
    for row in engine["results"]:
        assert row["batches"] >= 2 and row["tiles_per_s"] > 0 and row["ms_p99"] >= row["ms_p50"] > 0
        assert row["eager"]["tiles_per_s"] > 0 and row["speedup"] > 0


def test_bench_engine_compares_every_cpu_engine_in_one_run(tiny_bundle_int8, tmp_path, capsys):
    from edge_daemon.bench.engine import CPU_ENGINES
    from engines.cpuinfo import bf16_isa, read_cpuinfo

    out = tmp_path / "bench.json"
    rc = bench_cli.main(["engine", "--bundle", str(tiny_bundle_int8), "--engines", "cpu", "--batch", "1,2",
                         "--seconds", "0.05", "--min-iters", "2", "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    specs = [e["spec"] for e in report["engines"]]
    assert specs == CPU_ENGINES.split(",")
    ran = {e["engine"]: e for e in report["engines"] if "results" in e}
    must_run = {"onnxruntime/cpu/fp32", "onnxruntime/cpu/int8", "openvino/cpu/fp32", "openvino/cpu/int8"}
    assert must_run <= set(ran)
    assert ran["openvino/cpu/int8"]["runtime"]["layers"].get("u8", 0) >= 1
    for engine in ran.values():
        assert all(row["speedup"] > 0 for row in engine["results"])
    bf16 = next(e for e in report["engines"] if e["spec"] == "openvino:bf16")
    if bf16_isa(read_cpuinfo().flags) is None:
        assert "AVX512-BF16" in bf16["unavailable"] and "openvino:bf16" in text and "unavailable" in text
    else:
        assert bf16["engine"] == "openvino/cpu/bf16"
    assert "x eager fp32" in text  # the closing summary table


def test_bench_engine_int8_on_a_bundle_without_it_says_why(tiny_bundle, capsys):
    rc = bench_cli.main(["engine", "--bundle", str(tiny_bundle), "--engines", "openvino:int8",
                         "--batch", "1", "--seconds", "0.05", "--min-iters", "1", "--threads", "1"])
    assert rc == 1  # nothing ran
    assert "carries no int8 model" in capsys.readouterr().out


@pytest.mark.parametrize("text, expected", [
    (None, [("onnxruntime", "fp32", None)]),
    ("openvino:int8:throughput,torch", [("openvino", "int8", "throughput"), ("torch", None, None)]),
    ("cpu", [("onnxruntime", "fp32", None), ("onnxruntime", "int8", None), ("openvino", "fp32", None),
             ("openvino", "bf16", None), ("openvino", "int8", None)]),
])
def test_parse_engines(text, expected):
    from edge_daemon.bench.engine import parse_engines

    assert parse_engines(text, "onnxruntime", "fp32") == expected


def test_parse_engines_rejects_garbage():
    from edge_daemon.bench.engine import parse_engines

    with pytest.raises(ValueError, match="backend\\[:precision"):
        parse_engines("a:b:c:d", "auto", None)
