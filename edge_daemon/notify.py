"""sd_notify without the systemd package: datagrams on $NOTIFY_SOCKET (path or '@' abstract name).

Outside systemd (no NOTIFY_SOCKET) every call is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier", "watchdog_interval_s"]


def watchdog_interval_s(env: dict | None = None) -> float | None:
    """Half of WATCHDOG_USEC (when it is meant for this process), or None when no watchdog is asked for."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._sock = None
        self._addr = None
        if address:
            self._addr = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        message = "\n".join(fields).encode()
        try:
            self._sock.sendto(message, self._addr)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
