"""The systemd unit: notify type, watchdog, restart, hardening that keeps the GPU reachable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-inspect.service"


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit():
    return _parse(UNIT.read_text())


def test_service_contract(unit):
    svc = unit["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert int(svc["WatchdogSec"][0]) > 0 and svc["Restart"] == ["on-failure"]
    assert svc["User"] == ["edge-inspect"]
    assert any("edge-engines build" in c or "edge-engines check" in c for c in svc["ExecStartPre"])
    assert "edge-daemon run --config" in svc["ExecStart"][0]
    assert int(svc["TimeoutStopSec"][0]) > 10  # longer than the daemon's default shutdown_timeout_s
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_hardening_keeps_gpu(unit):
    svc = unit["Service"]
    assert "PrivateDevices" not in svc and "MemoryDenyWriteExecute" not in svc
    assert svc["DevicePolicy"] == ["closed"]
    allowed = set(svc["DeviceAllow"])
    for device in ("/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia-frontend rw"):
        assert device in allowed
    assert svc["ProtectSystem"] == ["strict"] and svc["NoNewPrivileges"] == ["yes"]
    rw = " ".join(svc["ReadWritePaths"])
    assert "/var/cache/edge-inspect" in rw and "/run/edge-inspect" in rw


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify(tmp_path):
    # point the unit at this venv's entry points so that verify can check the executables exist
    text = UNIT.read_text().replace("/opt/edge-inspect/.venv/bin", str(Path(sys.executable).parent))
    unit = tmp_path / "edge-inspect.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr, result.stderr
