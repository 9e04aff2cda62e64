"""sd_notify spoken through real unix datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from edge_daemon.notify import Notifier, watchdog_interval_s


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(2.0)
    return sock


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_arrive(tmp_path, abstract):
    address = f"@edge-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    listener = _listener(address)
    notifier = Notifier(address)
    try:
        assert notifier.enabled
        assert notifier.ready("serving")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving"
        assert notifier.watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert listener.recv(4096) == b"STOPPING=1"
        assert notifier.status("draining 3 frames")
        assert listener.recv(4096) == b"STATUS=draining 3 frames"
    finally:
        notifier.close()
        listener.close()


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.ready() is False


def test_watchdog_interval():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
