"""One error style for the five command lines (issue 13): every failure a newcomer met gives one line on
stderr naming the problem and the fix, the documented exit code, and no traceback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from daemon_helpers import daemon_config

from edge_daemon import cli as daemon_cli
from edge_daemon.bench import cli as bench_cli
from edge_inspect import cli as inspect_cli
from engines import cli as engines_cli
from engines.cli_common import EXIT_INTERRUPTED, EXIT_USAGE, error_line, run_cli
from trainer import cli as trainer_cli

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "; fix: " in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def corrupt_bundle(tiny_bundle, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"x")
    return copy


def _config(tmp_path, bundle, **endpoints) -> Path:
    path, data = daemon_config(tmp_path, bundle)
    data["endpoints"].update(endpoints)
    path.write_text(yaml.safe_dump(data))
    return path


# ---- the same corrupt or missing bundle: exit 2 from every command ----------------------------------------


@pytest.mark.parametrize("which", ["corrupt", "missing"])
def test_a_bad_bundle_is_exit_2_everywhere(which, corrupt_bundle, tmp_path, capsys):
    bundle = str(corrupt_bundle if which == "corrupt" else tmp_path / "no-such-bundle")
    config = _config(tmp_path, bundle)
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((32, 32), np.uint8))
    calls = [
        ("edge-engines check", lambda: engines_cli.main(["check", "--bundle", bundle])),
        ("edge-daemon check-config", lambda: daemon_cli.main(["check-config", str(config)])),
        ("edge-bench engine", lambda: bench_cli.main(["engine", "--bundle", bundle, "--backend",
                                                      "onnxruntime", "--batch", "1", "--seconds", "0.01"])),
        ("edge-inspect predict", lambda: inspect_cli.main(["predict", "--bundle", bundle, str(image),
                                                           "--out", str(tmp_path / "p")])),
    ]
    for prog, call in calls:
        assert call() == EXIT_USAGE, prog
        line = one_error_line(capsys, prog)
        assert ("sha256" if which == "corrupt" else "does not exist") in line, line


def test_daemon_run_refuses_a_corrupt_bundle_in_one_line(corrupt_bundle, tmp_path):
    config = _config(tmp_path, corrupt_bundle)
    proc = subprocess.run([sys.executable, "-m", "edge_daemon", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().startswith("edge-daemon run: error: engine.bundle:")
    assert "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr and "child.started" not in proc.stderr


# ---- ports in use: check-config and run say so before anything starts ------------------------------------


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("key", ["ingest", "output", "metrics_port"])
def test_check_config_finds_a_port_in_use(key, taken_port, tiny_bundle, tmp_path, capsys):
    value = taken_port if key == "metrics_port" else f"tcp://127.0.0.1:{taken_port}"
    config = _config(tmp_path, tiny_bundle, **{key: value})
    assert daemon_cli.main(["check-config", str(config)]) == EXIT_USAGE
    line = one_error_line(capsys, "edge-daemon check-config")
    assert f"endpoints.{key}: port {taken_port}" in line and "already in use" in line


@pytest.mark.parametrize("key", ["ingest", "metrics_port"])
def test_run_finds_a_port_in_use_at_once(key, taken_port, tiny_bundle, tmp_path):
    value = taken_port if key == "metrics_port" else f"tcp://127.0.0.1:{taken_port}"
    config = _config(tmp_path, tiny_bundle, **{key: value})
    proc = subprocess.run([sys.executable, "-m", "edge_daemon", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"endpoints.{key}: port {taken_port}" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ZMQError" not in proc.stderr


def test_two_endpoints_on_one_port(tiny_bundle, tmp_path, capsys):
    config = _config(tmp_path, tiny_bundle, output="tcp://127.0.0.1:5999", ingest="tcp://127.0.0.1:5999")
    assert daemon_cli.main(["check-config", str(config)]) == EXIT_USAGE
    assert "endpoints.output: port 5999 is also used by endpoints.ingest" in one_error_line(
        capsys, "edge-daemon check-config")


# ---- relative paths: the current directory, as the README writes them ------------------------------------


def test_relative_bundle_means_the_current_directory(tiny_bundle, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["endpoints"] = {"ingest": "tcp://127.0.0.1:0", "output": "tcp://127.0.0.1:0", "metrics_port": None}
    (tmp_path / "configs" / "demo.yaml").write_text(yaml.safe_dump(data))
    shutil.copytree(tiny_bundle, tmp_path / "runs" / "line3")
    shutil.copytree(tiny_bundle, tmp_path / "runs" / "demo" / "bundle")
    monkeypatch.chdir(tmp_path)
    assert daemon_cli.main(["check-config", "configs/demo.yaml", "--bundle", "runs/line3"]) == 0
    assert f"bundle {tmp_path / 'runs' / 'line3'}" in capsys.readouterr().out
    assert daemon_cli.main(["check-config", "configs/demo.yaml"]) == 0  # its own runs/demo/bundle
    assert f"bundle {tmp_path / 'runs' / 'demo' / 'bundle'}" in capsys.readouterr().out


def test_demo_config_speaks_of_the_product():
    text = (ROOT / "configs" / "demo.yaml").read_text()
    assert "lead" not in text.lower() and "bundle: runs/demo/bundle" in text


# ---- edge-train -------------------------------------------------------------------------------------------


@pytest.fixture
def good_folder(tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (40, 40), dtype=np.uint8))
    return folder


def test_train_unknown_model_option(good_folder, tmp_path, capsys):
    argv = ["train", "--folder", str(good_folder), "--kind", "dfr", "--option", "pretrained=false",
            "--option", "foo=1", "--tile", "32", "--steps", "1", "--out", str(tmp_path / "o")]
    assert trainer_cli.main(argv) == EXIT_USAGE
    line = one_error_line(capsys, "edge-train train")
    assert "foo" in line and "not accepted by dfr-s" in line


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--tile", "-1"), ("--lr", "0"),
                                            ("--frr", "1.5"), ("--batch-size", "x")])
def test_train_rejects_impossible_values(option, value, good_folder, tmp_path, capsys):
    argv = ["train", "--folder", str(good_folder), option, value, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        trainer_cli.main(argv)
    assert info.value.code == EXIT_USAGE
    line = one_error_line(capsys, "edge-train train")
    assert option in line and not (tmp_path / "o").exists()


# ---- help, --version --------------------------------------------------------------------------------------


def test_usage_errors_are_one_line_with_the_fix(capsys):
    with pytest.raises(SystemExit) as info:
        daemon_cli.main(["run"])  # --config missing
    assert info.value.code == EXIT_USAGE
    assert "--config" in one_error_line(capsys, "edge-daemon run")


def test_daemon_help_hides_the_internal_command():
    out = subprocess.run([sys.executable, "-m", "edge_daemon", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "SUPPRESS" not in out and "child" not in out and "check-config" in out


def test_run_cli_maps_interrupts_and_anticipated_errors(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_cli("x", interrupted) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "x: interrupted"
    assert run_cli("x", lambda: (_ for _ in ()).throw(FileNotFoundError("no such file: a"))) == EXIT_USAGE
    assert run_cli("x", lambda: (_ for _ in ()).throw(RuntimeError("worker\ndied"))) == 1
    assert capsys.readouterr().err.splitlines() == ["x: error: no such file: a", "x: error: worker died"]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli("x", lambda: 1 / 0)
    assert error_line("p", "a\n  b", "c") == "p: error: a b; fix: c"


@pytest.mark.slow  # torch import and model build in a subprocess: ~10-20 s on the shared cores
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_training_exits_130_without_traceback(sig, good_folder, tmp_path):
    import signal
    import threading
    import time

    argv = [sys.executable, "-m", "trainer", "train", "--folder", str(good_folder), "--kind", "dfr",
            "--option", "pretrained=false", "--tile", "32", "--steps", "1000000",
            "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while "train:" not in "".join(err) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # wait for the progress bar: the training loop is running
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(err)
    assert code == EXIT_INTERRUPTED, text[-3000:]
    assert "edge-train train: interrupted" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
