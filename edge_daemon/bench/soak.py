"""`edge-bench soak`: the real daemon under steady load for M minutes with faults injected periodically.

    edge-bench soak --minutes 30 [--bundle DIR] [--rate 20] [--cameras 2] [--json soak.json]

Starts ``edge-daemon run`` as a subprocess on loopback (a tiny built-in bundle unless --bundle is given),
sends frames at a steady rate from N cameras and, every --fault-every seconds, injects the next fault in
turn: kill -9 of the inference worker, a camera reconnect, a burst of malformed messages, an overload burst.
Every --report-every seconds it prints frames sent, records (verdict / error / drop), worker restarts, RSS
of the daemon's processes and its shared memory. At the end it drains, sends SIGTERM and reports lost
frames (sent, accepted by ZeroMQ, and never answered), duplicates, the exit code and the RSS growth after
warm-up. Not part of CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

__all__ = ["add_parser", "run", "tiny_bundle", "tree_rss", "shm_bytes"]

FAULTS = ("kill-worker", "camera-reconnect", "bad-messages", "overload-burst")


def add_parser(subparsers) -> None:
    from engines.cli_common import fraction, positive_float, positive_int

    p = subparsers.add_parser("soak", help="daemon under steady load with periodic faults (not in CI)")
    p.add_argument("--minutes", type=positive_float, default=30.0, help="length of the run")
    p.add_argument("--bundle", help="model bundle; default: a tiny built-in one (32x32 mono tiles)")
    p.add_argument("--rate", type=positive_float, default=20.0, help="frames per second per camera")
    p.add_argument("--cameras", type=positive_int, default=2, help="simulated cameras")
    p.add_argument("--size", default="128x128", help="frame WxH (mono8)")
    p.add_argument("--fault-every", type=positive_float, default=30.0, help="seconds between injected faults")
    p.add_argument("--report-every", type=positive_float, default=15.0, help="seconds between progress lines")
    p.add_argument("--warmup", type=fraction, default=0.2, help="fraction of the run before the RSS baseline")
    p.add_argument("--json", help="write the samples and the summary here; default: print the summary only")
    p.set_defaults(func=run, quick_caps={"minutes": 0.2, "fault_every": 4.0, "report_every": 4.0,
                                         "rate": 5.0})


def tiny_bundle(out_dir: Path) -> Path:
    """A small translation-equivariant conv net (32x32 mono tiles, 8x8 maps) exported as a real bundle.

    The deployable graph replicates mono to three channels before the core, hence Conv2d(3, ...)."""
    import torch
    from torch import nn

    from engines.bundle import BundleMeta, InputSpec, MapSpec
    from engines.graph import export_bundle

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Conv2d(8, 2, 1)
            )

        def forward(self, x):
            return self.body(x).abs()

    meta = BundleMeta(
        kind="soak",
        size="tiny",
        input=InputSpec(height=32, width=32, channels=1, mean=(0.5,) * 3, std=(0.25,) * 3),
        map=MapSpec(height=8, width=8, stride=4, q_a=(0.0, 0.0), q_b=(1.0, 2.0), weights=(0.5, 0.5)),
        image_threshold=0.5,
        pixel_threshold=0.5,
    )
    export_bundle(Tiny().eval(), meta, out_dir)
    return out_dir


# ---- process figures --------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out


def tree_rss(pid: int) -> int:
    """RSS (bytes) of a process and its children."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def shm_bytes(instance: str) -> int:
    """Bytes actually allocated by this instance's shared-memory segments."""
    prefix = f"edge-inspect-{instance}-"
    return sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob(prefix + "*"))


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name = key.split("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


# ---- the run ----------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args, workdir: Path):
        from edge_daemon.transport import free_tcp_port

        self.args = args
        self.width, self.height = (int(v) for v in args.size.lower().split("x"))
        self.instance = f"soak{os.getpid()}"
        self.ports = {k: free_tcp_port() for k in ("ingest", "output", "metrics")}
        bundle = Path(args.bundle) if args.bundle else tiny_bundle(workdir / "bundle")
        config = {
            "engine": {"bundle": str(bundle), "backend": "onnxruntime", "max_batch": 16, "threads": 1},
            "workers": 1,
            "endpoints": {
                "ingest": f"tcp://127.0.0.1:{self.ports['ingest']}",
                "output": f"tcp://127.0.0.1:{self.ports['output']}",
                "metrics_port": self.ports["metrics"],
            },
            "max_frame": {"width": max(self.width, 64), "height": max(self.height, 64), "channels": 1},
            "queue": {"slots": 24, "size": 16, "worker_credit": 4},
            "instance": self.instance,
            "runtime_dir": str(workdir / "run"),
            "inspection": {"tile_overlap": 0},
        }
        self.config_path = workdir / "daemon.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "daemon.log"
        self.answered: dict[tuple[str, int], str] = {}
        self.duplicates = 0
        self.sent: set[tuple[str, int]] = set()
        self.refused = 0  # sends ZeroMQ did not accept within the timeout (camera side)
        self.bad_sent = self.bad_answered = 0
        self.samples: list[dict] = []
        self.faults: list[tuple[float, str]] = []
        rng = np.random.default_rng(0)
        self.frames = [rng.integers(0, 256, (self.height, self.width), dtype=np.uint8) for _ in range(8)]

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in finish()
        env = {k: v for k, v in os.environ.items() if k != "EDGE_INSPECT_QUICK"}  # the soak stops it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("daemon not healthy within 120 s")

    def open_clients(self) -> None:
        from edge_daemon.client import FramePublisher, VerdictSubscriber

        self.sub = VerdictSubscriber(f"tcp://127.0.0.1:{self.ports['output']}")
        self.cams = [self._camera(f"cam{i}") for i in range(self.args.cameras)]
        self.bad = FramePublisher(f"tcp://127.0.0.1:{self.ports['ingest']}", "bad", send_timeout_s=1.0)
        self.next_id = {c.camera_id: 0 for c in self.cams}

    def _camera(self, camera_id: str):
        from edge_daemon.client import FramePublisher

        return FramePublisher(
            f"tcp://127.0.0.1:{self.ports['ingest']}", camera_id, hwm=1000, send_timeout_s=1.0
        )

    def send(self, cam_index: int) -> None:
        cam = self.cams[cam_index]
        fid = self.next_id[cam.camera_id]
        self.next_id[cam.camera_id] += 1
        try:
            cam.send(self.frames[fid % len(self.frames)], frame_id=fid)
            self.sent.add((cam.camera_id, fid))
        except TimeoutError:
            self.refused += 1

    def receive(self, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while True:
            item = self.sub.recv(max(0.0, deadline - time.monotonic()))
            if item is None:
                return
            if item.camera_id in ("bad", "unknown"):
                self.bad_answered += 1
                continue
            key = (item.camera_id, item.frame_id)
            if key in self.answered:
                self.duplicates += 1
            self.answered[key] = item.kind

    def inject(self, elapsed: float) -> None:
        fault = FAULTS[len(self.faults) % len(FAULTS)]
        self.faults.append((round(elapsed, 1), fault))
        if fault == "kill-worker":
            workers = [p for p in _children(self.proc.pid) if "worker" in _cmdline(p)]
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
        elif fault == "camera-reconnect":
            self.cams[0].close()
            self.cams[0] = self._camera(self.cams[0].camera_id)
        elif fault == "bad-messages":
            for i in range(50):
                self.bad.send_parts([b"\xc1junk" if i % 2 else b"\x80", b"x"])
                self.bad_sent += 1
        else:
            for _ in range(200):
                self.send(0)

    def sample(self, elapsed: float) -> dict:
        try:
            m = _metrics(self.ports["metrics"])
        except OSError:
            m = {}
        kinds = list(self.answered.values())
        row = {
            "t_s": round(elapsed, 1),
            "sent": len(self.sent),
            "verdicts": kinds.count("verdict"),
            "errors": kinds.count("error"),
            "drops": kinds.count("drop"),
            "bad_sent": self.bad_sent,
            "bad_answered": self.bad_answered,
            "restarts": int(m.get("edge_worker_restarts_total", 0)),
            "rss_mb": round(tree_rss(self.proc.pid) / 2**20, 1),
            "shm_mb": round(shm_bytes(self.instance) / 2**20, 2),
            "load1": round(os.getloadavg()[0], 2),
        }
        self.samples.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        return row

    def finish(self) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.sent <= set(self.answered):
            self.receive(0.5)
        self.receive(1.0)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for sock in [*self.cams, self.bad, self.sub]:
            sock.close()
        self._log.close()
        return self.summary(code)

    def summary(self, code: int) -> dict:
        baseline_t = self.args.warmup * self.args.minutes * 60
        after = [s for s in self.samples if s["t_s"] >= baseline_t] or self.samples
        # medians of three samples: one taken while a killed worker restarts must not set the baseline
        base = float(np.median([s["rss_mb"] for s in after[:3]]))
        last = float(np.median([s["rss_mb"] for s in self.samples[-3:]]))
        kinds = [self.answered[k] for k in self.sent if k in self.answered]
        return {
            "minutes": self.args.minutes,
            "frames_sent": len(self.sent),
            "refused_by_zmq": self.refused,
            "answered": len(kinds),
            "verdicts": kinds.count("verdict"),
            "errors": kinds.count("error"),
            "drops": kinds.count("drop"),
            "lost": len(self.sent - set(self.answered)),
            "duplicates": self.duplicates,
            "bad_sent": self.bad_sent,
            "bad_answered": self.bad_answered,
            "faults": len(self.faults),
            "restarts": self.samples[-1]["restarts"] if self.samples else 0,
            "rss_baseline_mb": base,
            "rss_end_mb": last,
            "rss_max_after_warmup_mb": max(s["rss_mb"] for s in after),
            "rss_growth_pct": round(100 * (last - base) / base, 2) if base else None,
            "shm_mb_max": max(s["shm_mb"] for s in self.samples) if self.samples else 0,
            "exit_code": code,
            "clean_stop": "clean=True" in self.log_path.read_text(errors="replace"),
        }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def _loop(soak: Soak, seconds: float) -> None:
    args = soak.args
    period = 1.0 / args.rate
    start = time.monotonic()
    next_send, next_fault, next_report = start, start + args.fault_every, start
    while (now := time.monotonic()) - start < seconds:
        if now >= next_send:
            for i in range(len(soak.cams)):
                soak.send(i)
            next_send += period
        if now >= next_fault:
            soak.inject(now - start)
            next_fault += args.fault_every
        if now >= next_report:
            soak.sample(now - start)
            next_report += args.report_every
        soak.receive(max(0.0, min(next_send, next_fault, next_report) - time.monotonic()))
    soak.sample(time.monotonic() - start)


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="edge-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        soak.start()
        try:
            soak.open_clients()
            _loop(soak, args.minutes * 60)
            result = soak.finish()
        finally:
            if soak.proc.poll() is None:
                soak.proc.kill()
                soak.proc.wait()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summary": result, "samples": soak.samples, "faults": soak.faults})
        )
    ok = result["lost"] == 0 and result["duplicates"] == 0 and result["exit_code"] == 0
    return 0 if ok else 1
