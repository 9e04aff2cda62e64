"""Supervisor (the main process): owns the shared memory, starts and watches ingest, N inference workers and
the publisher (subprocesses: nothing is pickled), aggregates metrics, speaks sd_notify, and runs the one
shutdown path.

Children: ``python -m edge_daemon child <role> --runtime-dir D --index I --gen G --parent PID``. They read
the resolved config from ``D/state.json``, set PR_SET_PDEATHSIG and check their parent pid, so they die
with the supervisor. A dead worker is restarted (next generation) and ingest gives its in-flight frames
"worker lost" error records; a dead ingest or publisher is fatal (exit 1, systemd restarts the unit).
``process_mode: single``: one child (role ``single``: ingest, worker and publisher in one loop, no shared
memory), whose death is fatal like ingest's.

Shutdown (SIGTERM, SIGINT: both become the ``quit`` command): STOPPING=1; ingest stops receiving, drains
its queue through the workers and reports how many messages it received; workers exit; the publisher
exits after publishing that many records; exit 0. Past ``shutdown_timeout_s`` what is left is killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from .config import ConfigError, DaemonConfig, config_from_mapping
from .logs import get_logger, log, setup_logging
from .metrics import Aggregator, MetricsServer
from .notify import Notifier, watchdog_interval_s
from .shm import SlotRing, cleanup_stale
from .transport import close_socket, ipc_endpoint, make_socket, recv_msg, send_msg

__all__ = ["Supervisor", "run_daemon", "child_main", "set_parent_death_signal"]

STATE_FILE = "state.json"
HEARTBEAT_S = 5.0
MAX_RESTARTS = 5  # per RESTART_WINDOW_S, then the daemon gives up (exit 1)
RESTART_WINDOW_S = 60.0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends ``sig`` when the parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG


@dataclass
class Child:
    role: str
    index: int
    gen: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def source(self) -> str:
        return f"worker-{self.index}-g{self.gen}" if self.role == "worker" else self.role

    def alive(self) -> bool:
        return self.proc.poll() is None


class Supervisor:
    def __init__(self, cfg: DaemonConfig, stop_after_s: float | None = None):
        self.cfg = cfg
        self.stop_after_s = stop_after_s  # stop this long after ready (smoke tests); None: run until stopped
        self.ready_at: float | None = None
        self._made_runtime = False
        self.logger = get_logger()
        self.notifier = Notifier()
        self.agg = Aggregator()
        self.agg.local.declare("edge_worker_restarts_total", [{"worker": str(i)} for i in range(cfg.workers)])
        self.children: dict[tuple[str, int], Child] = {}
        self.quit_reason: str | None = None
        self.fatal: str | None = None
        self.restarts: deque[float] = deque()
        self.received: int | None = None
        self.published: int | None = None
        self.notified_ready = False
        self.runtime = cfg.runtime_path
        self._lock_fh = None
        self.metrics_server: MetricsServer | None = None

    # ---- start ------------------------------------------------------------------------------------------
    def _prepare_runtime(self) -> None:
        self._made_runtime = not self.runtime.exists()
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fh = open(self.runtime / "lock", "w")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fh = lock_fh  # from here on the runtime directory is ours (removed by close)
        except BlockingIOError as exc:
            lock_fh.close()
            raise ConfigError(
                f"instance: another daemon of instance {self.cfg.instance!r} runs "
                f"(lock {self.runtime / 'lock'} is held)"
            ) from exc
        stale = cleanup_stale(self.cfg.instance)
        for path in self.runtime.glob("*.ipc"):
            path.unlink(missing_ok=True)
        if stale:
            log(self.logger, "shm.cleaned", segments=",".join(stale))

    def start(self) -> None:
        from engines.bundle import read_bundle

        from .worker import check_tiling, inspect_configs

        self._prepare_runtime()
        try:  # a missing or tampered bundle (sha256 mismatch) or an impossible tiling: exit 2, no children
            meta = read_bundle(self.cfg.engine.bundle)
            check_tiling(inspect_configs(self.cfg, meta), meta)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        single = self.cfg.process_mode == "single"
        state = {"config": self.cfg.to_mapping(), "ring": None, "slot_bytes": self.cfg.max_frame.nbytes}
        if not single:  # the single-process mode keeps frames in its own memory
            self.ring = SlotRing.create(self.cfg.instance, self.cfg.queue.slots, self.cfg.max_frame.nbytes)
            state.update(ring=self.ring.name, slot_bytes=self.ring.slot_bytes)
        (self.runtime / STATE_FILE).write_text(json.dumps(state))
        self.ctx = zmq.Context()
        self.stats = make_socket(self.ctx, zmq.PULL)
        self.stats.bind(ipc_endpoint(self.runtime, "stats.ipc"))
        self.to_ingest = make_socket(self.ctx, zmq.PUSH)
        self.to_ingest.connect(ipc_endpoint(self.runtime, "ingest.ipc"))
        self.to_publisher = make_socket(self.ctx, zmq.PUSH)
        self.to_publisher.connect(ipc_endpoint(self.runtime, "publisher.ipc"))
        if single:
            self._spawn("single", 0, 1)
        else:
            self._spawn("publisher", 0, 1)
            for i in range(self.cfg.workers):
                self._spawn("worker", i, 1)
            self._spawn("ingest", 0, 1)
        if self.cfg.endpoints.metrics_port is not None:
            try:
                self.metrics_server = MetricsServer(
                    self.agg, self.cfg.endpoints.metrics_host, self.cfg.endpoints.metrics_port, self.healthy
                ).start()
            except OSError as exc:  # taken since the bind test of edge_daemon.ports
                raise ConfigError(f"endpoints.metrics_port: cannot serve metrics on "
                                  f"{self.cfg.endpoints.metrics_host}:{self.cfg.endpoints.metrics_port}: "
                                  f"{exc}") from exc
        log(
            self.logger,
            "daemon.starting",
            instance=self.cfg.instance,
            model=meta.model_id,
            workers=self.cfg.workers,
            process_mode=self.cfg.process_mode,
            ingest=self.cfg.endpoints.ingest,
            output=self.cfg.endpoints.output,
            metrics_port=self.metrics_server.port if self.metrics_server else "-",
        )
        self.notifier.status("starting: warming engines")

    def _spawn(self, role: str, index: int, gen: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "edge_daemon",
            "child",
            role,
            "--runtime-dir",
            str(self.runtime),
            "--index",
            str(index),
            "--gen",
            str(gen),
            "--parent",
            str(os.getpid()),
        ]
        env = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        self.children[(role, index)] = Child(role, index, gen, proc)
        log(self.logger, "child.started", role=role, index=index, gen=gen, pid=proc.pid)

    # ---- messages from children -------------------------------------------------------------------------
    def _on_stats(self, msg: dict) -> None:
        kind = msg.get("t")
        child = self._child_of(msg.get("source", ""))
        if child is not None:
            child.last_seen = time.monotonic()
        if kind == "stats":
            self.agg.update(msg["source"], msg["snapshot"])
        elif kind == "ready" and child is not None:
            child.ready = True
            log(self.logger, "worker.ready", worker=child.index, gen=child.gen)
        elif kind == "drained":
            self.received = int(msg["received"])
        elif kind == "published":
            self.published = int(msg["count"])

    def _child_of(self, source: str) -> Child | None:
        return next((c for c in self.children.values() if c.source == source), None)

    def _pump(self, timeout_ms: int) -> None:
        if self.stats.poll(timeout_ms, zmq.POLLIN):
            for _ in range(1000):
                try:
                    self._on_stats(recv_msg(self.stats, zmq.NOBLOCK))
                except zmq.Again:
                    break

    # ---- health -----------------------------------------------------------------------------------------
    def workers(self) -> list[Child]:
        return [c for c in self.children.values() if c.role == "worker"]

    def inspecting(self) -> list[Child]:
        """The children that run an engine: the workers, or the one process of the single-process mode."""
        return [c for c in self.children.values() if c.role in ("worker", "single")]

    def healthy(self) -> bool:
        now = time.monotonic()
        inspecting = self.inspecting()
        workers_ok = all(c.alive() and c.ready and now - c.last_seen < HEARTBEAT_S for c in inspecting)
        # healthy also means the metrics page is whole: every child's counters (zeros included) are on it
        children_ok = all(c.alive() and self.agg.reported(c.source) for c in self.children.values())
        return bool(inspecting) and workers_ok and children_ok

    def _check_children(self) -> None:
        for child in list(self.children.values()):
            code = child.proc.poll()
            if code is None:
                continue
            self.agg.mark_dead(child.source)
            if child.role != "worker":
                self.fatal = f"{child.role} exited with code {code}"
                log(self.logger, "child.fatal", logging.ERROR, role=child.role, code=code)
                return
            self._restart_worker(child, code)

    def _restart_worker(self, child: Child, code: int) -> None:
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        log(
            self.logger,
            "worker.died",
            logging.ERROR,
            worker=child.index,
            gen=child.gen,
            code=code,
            restarts_in_window=len(self.restarts),
        )
        send_msg(self.to_ingest, {"t": "worker_lost", "worker": child.index, "gen": child.gen})
        self.agg.local.inc("edge_worker_restarts_total", {"worker": str(child.index)})
        if len(self.restarts) > MAX_RESTARTS:
            self.fatal = f"workers died {len(self.restarts)} times in {RESTART_WINDOW_S:g} s"
            return
        self._spawn("worker", child.index, child.gen + 1)

    # ---- main loop --------------------------------------------------------------------------------------
    def request_quit(self, reason: str) -> None:
        if self.quit_reason is None:
            self.quit_reason = reason

    def serve(self) -> None:
        interval = watchdog_interval_s()
        last_ping = 0.0
        while self.quit_reason is None and self.fatal is None:
            self._pump(100)
            self._check_children()
            healthy = self.healthy()
            self.agg.local.set("edge_workers_healthy", sum(c.alive() and c.ready for c in self.inspecting()))
            if not self.notified_ready and healthy:
                self.notified_ready = True
                self.notifier.ready(f"serving: {self.cfg.workers} worker(s) warm")
                log(self.logger, "daemon.ready", workers=self.cfg.workers)
                self.ready_at = time.monotonic()
            now = time.monotonic()
            if self.stop_after_s is not None and self.ready_at is not None \
                    and now - self.ready_at >= self.stop_after_s:
                self.request_quit(f"stop-after {self.stop_after_s:g} s")
            if interval and healthy and now - last_ping >= interval:
                self.notifier.watchdog()
                last_ping = now

    def shutdown(self) -> bool:
        """The one shutdown path; True when everything drained and exited in time."""
        reason = self.fatal or self.quit_reason or "exit"
        self.notifier.stopping(f"stopping: {reason}")
        log(self.logger, "daemon.stopping", reason=reason)
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        ingest = self.children.get(("ingest", 0)) or self.children.get(("single", 0))
        if ingest is not None and ingest.alive():
            send_msg(self.to_ingest, {"t": "stop", "timeout_s": 0.6 * self.cfg.shutdown_timeout_s})
            while self.received is None and ingest.alive() and time.monotonic() < deadline:
                self._pump(50)
                self._lost_while_draining()
        self._stop_role("worker", deadline)
        self._stop_role("ingest", deadline)
        publisher = self.children.get(("publisher", 0))
        if publisher is not None and publisher.alive():
            remaining = max(0.1, deadline - time.monotonic())
            send_msg(self.to_publisher, {"t": "stop", "expect": self.received or 0, "timeout_s": remaining})
            while publisher.alive() and time.monotonic() < deadline:
                self._pump(50)
        killed = self._stop_role("publisher", deadline)
        killed |= self._stop_single(deadline)
        self._pump(0)
        clean = (
            self.fatal is None
            and not killed
            and self.received is not None
            and self.published is not None
            and self.published >= self.received
        )
        log(self.logger, "daemon.stopped", clean=clean, received=self.received, published=self.published)
        return clean

    def _stop_single(self, deadline: float) -> bool:
        """The single process exits by itself once drained; its last message (``published``) may still
        be on its way when it has exited. True if it had to be killed."""
        single = self.children.get(("single", 0))
        if single is None:
            return False
        while single.alive() and self.received is not None and time.monotonic() < deadline:
            self._pump(50)
        killed = self._stop_role("single", deadline)
        while self.published is None and self.received is not None and time.monotonic() < deadline:
            self._pump(50)
        return killed

    def _lost_while_draining(self) -> None:
        """A worker that dies during the drain is not restarted; its frames get "worker lost" records."""
        for child in self.workers():
            if not child.alive() and child.ready:
                child.ready = False
                self.agg.mark_dead(child.source)
                send_msg(self.to_ingest, {"t": "worker_lost", "worker": child.index, "gen": child.gen})

    def _stop_role(self, role: str, deadline: float) -> bool:
        """SIGTERM the role's children, wait until the deadline, then SIGKILL; True if any was killed."""
        procs = [c for c in self.children.values() if c.role == role and c.alive()]
        for child in procs:
            child.proc.terminate()
        killed = False
        for child in procs:
            try:
                child.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=5)
                killed = True
                log(self.logger, "child.killed", logging.WARNING, role=role, index=child.index)
            self._pump(0)
        return killed

    def close(self) -> None:
        for child in self.children.values():
            if child.alive():
                child.proc.kill()
                child.proc.wait(timeout=5)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for name in ("stats", "to_ingest", "to_publisher"):
            if hasattr(self, name):
                close_socket(getattr(self, name))
        if hasattr(self, "ctx"):
            self.ctx.term()
        if hasattr(self, "ring"):
            self.ring.close()
        self.notifier.close()
        self._remove_runtime()  # while the lock is still held
        if self._lock_fh is not None:
            self._lock_fh.close()

    def _remove_runtime(self) -> None:
        """Remove what the daemon put in its runtime directory, and the directory when it made it."""
        if self._lock_fh is None:
            return  # never prepared (or another instance holds it): nothing of ours is there
        for pattern in ("*.ipc", STATE_FILE, "lock"):
            for path in self.runtime.glob(pattern):
                path.unlink(missing_ok=True)
        if self._made_runtime:
            try:
                self.runtime.rmdir()
            except OSError:
                pass  # something else was put there: leave it


def run_daemon(cfg: DaemonConfig, stop_after_s: float | None = None) -> int:
    setup_logging("supervisor", cfg.log_format, cfg.log_level)
    sup = Supervisor(cfg, stop_after_s)
    signal.signal(signal.SIGTERM, lambda *_: sup.request_quit("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: sup.request_quit("SIGINT"))
    try:
        sup.start()
        sup.serve()
        clean = sup.shutdown()
    except ConfigError as exc:
        log(sup.logger, "daemon.config_error", logging.ERROR, error=str(exc))
        return 2
    finally:
        sup.close()
    return 0 if clean and sup.fatal is None else 1


# ---- children -------------------------------------------------------------------------------------------


def child_main(role: str, runtime_dir: str, index: int, gen: int, parent: int) -> int:
    """Entry point of every child process."""
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        return 1  # the supervisor died before prctl took effect
    state = json.loads((Path(runtime_dir) / STATE_FILE).read_text())
    cfg = config_from_mapping(state["config"])
    setup_logging(f"{role}-{index}" if role == "worker" else role, cfg.log_format, cfg.log_level)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides

    def should_exit() -> bool:
        return stop["flag"] or os.getppid() != parent

    if role == "ingest":
        from .ingest import run_ingest

        return run_ingest(cfg, state["ring"], state["slot_bytes"], should_exit)
    if role == "worker":
        from .worker import run_worker

        return run_worker(cfg, index, gen, state["ring"], state["slot_bytes"], should_exit)
    if role == "publisher":
        from .publisher import run_publisher

        return run_publisher(cfg, should_exit)
    if role == "single":
        from .single import run_single

        return run_single(cfg, should_exit)
    raise ValueError(f"unknown child role {role!r}")
