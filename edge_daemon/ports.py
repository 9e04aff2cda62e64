"""Bind test of the daemon's TCP ports before anything starts: `check-config` and `run` both call it, so a
port in use is one clear line naming the key and the port, not a child's ZMQError seconds later.

The endpoints the daemon binds: ``endpoints.ingest`` (ingest_mode pull), ``endpoints.imagezmq`` (imagezmq_mode
rep), ``endpoints.output`` and the HTTP metrics port. Connect-side endpoints (sub modes) are not tested.
A port that binds now can still be taken before the daemon binds it; the test catches the common case (a
second daemon, an old one still running, another program on the port).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from .config import ConfigError, DaemonConfig

__all__ = ["Bind", "daemon_binds", "check_ports", "parse_tcp"]


@dataclass(frozen=True)
class Bind:
    key: str  # config key, e.g. endpoints.ingest
    host: str  # "" = every interface
    port: int


def parse_tcp(endpoint: str) -> tuple[str, int] | None:
    """``tcp://HOST:PORT`` -> (host, port) with ``*`` as ""; None for other transports or a wildcard port."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    return ("" if host in ("*", "0.0.0.0") else host), int(port)


def daemon_binds(cfg: DaemonConfig) -> list[Bind]:
    ep = cfg.endpoints
    endpoints = [("endpoints.output", ep.output)]
    if ep.ingest_mode == "pull":
        endpoints.insert(0, ("endpoints.ingest", ep.ingest))
    if ep.imagezmq and ep.imagezmq_mode == "rep":
        endpoints.append(("endpoints.imagezmq", ep.imagezmq))
    binds = []
    for key, endpoint in endpoints:
        parsed = parse_tcp(endpoint)
        if parsed is not None and parsed[1] != 0:
            binds.append(Bind(key, *parsed))
    if ep.metrics_port:
        binds.append(Bind("endpoints.metrics_port", ep.metrics_host, ep.metrics_port))
    return binds


def _try_bind(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ and http.server do
        try:
            sock.bind(infos[0][4])
        except OSError as exc:
            return exc
    return None


def check_ports(cfg: DaemonConfig) -> None:
    """ConfigError naming the key when a port the daemon binds is taken or the address is not local."""
    seen: dict[int, str] = {}
    for bind in daemon_binds(cfg):
        if bind.port in seen:
            raise ConfigError(f"{bind.key}: port {bind.port} is also used by {seen[bind.port]}; "
                              f"give each endpoint its own port")
        seen[bind.port] = bind.key
        exc = _try_bind(bind.host, bind.port)
        if exc is None:
            continue
        where = f"{bind.host or '*'}:{bind.port}"
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            raise ConfigError(f"{bind.key}: port {bind.port} ({where}) is already in use (another "
                              f"edge-daemon instance or another program); stop it, or choose a free port for "
                              f"{bind.key}")
        if getattr(exc, "errno", None) == errno.EACCES:
            raise ConfigError(f"{bind.key}: no permission to bind {where} (ports below 1024 need "
                              f"privileges); choose a port >= 1024")
        raise ConfigError(f"{bind.key}: cannot bind {where}: {exc}; use an address of this machine, "
                          f"or * for every interface")
