"""Helpers for daemon tests: a config for a tiny bundle on free ports, the daemon as a subprocess, pyzmq
discipline (linger 0, timeouts, bounded waits)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

from edge_daemon.shm import cleanup_stale
from edge_daemon.transport import free_tcp_port

__all__ = [
    "daemon_config",
    "DaemonProcess",
    "scrape",
    "wait_until",
    "parse_metrics",
    "metric_sum",
    "collect",
    "handshake",
    "child_pids",
    "rss_bytes",
    "stopped_fields",
    "accounting",
]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:g} s")


def daemon_config(tmp_path: Path, bundle: Path, **overrides) -> tuple[Path, dict]:
    """Write a YAML config for ``bundle`` on free ports; returns (path, mapping)."""
    instance = f"t{uuid.uuid4().hex[:8]}"
    ports = {k: free_tcp_port() for k in ("ingest", "imagezmq", "output", "metrics")}
    data = {
        "engine": {
            "bundle": str(bundle),
            "backend": "onnxruntime",
            "max_batch": 8,
            "max_delay_us": 1000,
            "threads": 1,
        },
        "workers": 1,
        "endpoints": {
            "ingest": f"tcp://127.0.0.1:{ports['ingest']}",
            "imagezmq": f"tcp://127.0.0.1:{ports['imagezmq']}",
            "output": f"tcp://127.0.0.1:{ports['output']}",
            "metrics_port": ports["metrics"],
        },
        "max_frame": {"width": 256, "height": 256, "channels": 3, "bytes_per_sample": 1},
        "queue": {"slots": 24, "size": 16, "worker_credit": 4},
        "instance": instance,
        "runtime_dir": f"/tmp/ei-{instance}",
        "shutdown_timeout_s": 10,
        "map_downscale": 2,
        "inspection": {"tile_overlap": 0},
        "cameras": [{"id": "cam1"}, {"id": "cam2", "threshold": 1000.0}],
    }
    for key, value in overrides.items():
        data[key] = value
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def scrape(port: int, path: str = "/metrics", timeout_s: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class DaemonProcess:
    """``python -m edge_daemon run`` in a subprocess with its logs in a file; always killed at exit."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        extra_env: dict | None = None,
        instance: str = "",
        args: tuple[str, ...] = (),
    ):
        self.log_path = log_path
        self.instance = instance
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, metrics_port: int, timeout_s: float = 30.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return scrape(metrics_port, "/healthz", 0.5)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout_s, 0.1, "daemon healthy")

    def terminate(self, timeout_s: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """Kill a daemon still running (a failed test) and remove what a killed daemon leaves behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            if self.instance:
                cleanup_stale(self.instance)
        self._log.close()


def collect(sub, n: int, timeout_s: float, until=None) -> list:
    """Up to ``n`` items from a VerdictSubscriber within ``timeout_s`` (stops early when ``until(items)``)."""
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        item = sub.recv(0.1)
        if item is not None:
            out.append(item)
            if until is not None and until(out):
                break
    return out


def handshake(pub, sub, frame, timeout_s: float = 20.0) -> tuple[list, list]:
    """Send probe frames until one comes back (subscription live, no sleeps); (records, probe ids).

    The subscriber's connection is up before the first probe, so that the daemon has its subscription
    before it publishes a probe's record (a record published earlier is never delivered to it)."""
    if not sub.wait_connected(timeout_s):
        raise TimeoutError("subscriber never connected to the daemon's output")
    got, probes, deadline = [], [], time.monotonic() + timeout_s
    while not got and time.monotonic() < deadline:
        probes.append(pub.send(frame))
        got = collect(sub, 1, 0.3)
    if not got:
        raise TimeoutError("no record for probe frames: subscription never became live")
    return got, probes


def child_pids(logs: str) -> dict[tuple[str, int, int], int]:
    """(role, index, gen) -> pid, from the supervisor's child.started log lines."""
    found = re.findall(r"event=child.started role=(\w+) index=(\d+) gen=(\d+) pid=(\d+)", logs)
    return {(role, int(i), int(g)): int(pid) for role, i, g, pid in found}


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def stopped_fields(logs: str) -> dict[str, str]:
    """key=value fields of the supervisor's daemon.stopped line."""
    line = next(ln for ln in logs.splitlines() if "event=daemon.stopped" in ln)
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def accounting(port: int) -> dict[str, float]:
    """Totals of the accounting counters from /metrics."""
    m = parse_metrics(scrape(port)[1])
    names = ("received", "answered", "failed", "dropped")
    return {n: metric_sum(m, f"edge_frames_{n}_total") for n in names} | {"_raw": m}
