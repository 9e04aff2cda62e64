"""Runtime folders are removed at exit (issue 13): the temp directory is listed before and after a daemon that
stops on its own, on SIGTERM and on Ctrl-C (SIGINT), and before and after an interrupted demo. Each run gets
its own TMPDIR, so other work on the machine cannot disturb the listing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from daemon_helpers import daemon_config, scrape, wait_until

# not runtime folders of ours, and meant to stay: torch's compile cache (torch.export writes it, to be reused)
# and the .ses file ONNX Runtime's native library writes into $TMPDIR when it is imported
KEPT = ("torchinductor_", ".ses")


def listing(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith(KEPT))


@pytest.fixture
def tmpdir_short():
    """A private TMPDIR with a short path: unix socket paths (the daemon's ipc sockets) hold 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="eic-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmpdir: Path) -> dict:
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}


def _healthy(port: int) -> bool:
    try:
        return scrape(port, "/healthz", 0.5)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("how", ["stop-after", "SIGTERM", "SIGINT"])
def test_daemon_removes_its_runtime_folder(how, tiny_bundle, tmp_path, tmpdir_short):
    tmpdir = tmpdir_short
    path, data = daemon_config(tmp_path, tiny_bundle)
    data.pop("runtime_dir")  # the default: $TMPDIR/edge-inspect-<instance>
    path.write_text(yaml.safe_dump(data))
    before = listing(tmpdir)
    argv = [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)]
    if how == "stop-after":
        argv += ["--stop-after", "0.5"]
    proc = subprocess.Popen(argv, env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until(lambda: _healthy(data["endpoints"]["metrics_port"]) or proc.poll() is not None, 60.0)
        runtime = tmpdir / f"edge-inspect-{data['instance']}"
        if how != "stop-after":
            assert runtime.is_dir() and (runtime / "lock").exists()  # it was there while running
            proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert code == 0, log
    assert "clean=True" in log and "Traceback" not in log
    assert listing(tmpdir) == before == []


@pytest.mark.slow  # a quick demo: training a few steps, export, the daemon, the camera (~30-60 s here)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_demo_exits_130_with_summary_and_leaves_nothing(sig, tmp_path, tmpdir_short):
    pytest.importorskip("elpv_dataset")
    tmpdir = tmpdir_short
    workdir = tmp_path / "demo"  # shared by both runs would retrain; each run trains its few steps
    proc = subprocess.Popen([sys.executable, "-m", "edge_inspect", "demo", "--quick", "--keep-going",
                             "--workdir", str(workdir)], env=_env(tmpdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the first verdicts are printed
            line = proc.stdout.readline()
            lines.append(line)
            if line.strip().startswith("0 ") or line.strip().startswith("1 "):
                break
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err + out and "OverflowError" not in err
    assert "detection rate" in out and "daemon: stopped (exit code 0)" in out
    assert (workdir / "latest" / "report.html").is_file()
    assert listing(tmpdir) == []
