"""ZeroMQ plumbing shared by every process: sockets with linger and timeouts set, internal endpoint
names, msgpack messages on internal sockets, connection events from libzmq's socket monitor, and optional
CURVE with a ZAP allow-list."""

from __future__ import annotations

import socket as _socket
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from .protocol import pack, unpack_limited

__all__ = [
    "make_socket",
    "ipc_endpoint",
    "send_msg",
    "recv_msg",
    "free_tcp_port",
    "CurveServer",
    "close_socket",
    "SocketMonitor",
    "TRANSPORT_EVENTS",
    "INTERNAL_MAX_BYTES",
]

INTERNAL_MAX_BYTES = 1 << 20  # internal control messages (descriptors, stats snapshots)


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    linger_ms: int = 0,
    rcvtimeo_ms: int | None = None,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    maxmsgsize: int | None = None,
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if rcvtimeo_ms is not None:
        sock.setsockopt(zmq.RCVTIMEO, rcvtimeo_ms)
    if sndhwm is not None:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if maxmsgsize is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)
    return sock


def close_socket(sock: zmq.Socket, linger_ms: int = 0) -> None:
    if not sock.closed:
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.close()


# libzmq monitor events -> the names counted in edge_transport_events_total
_EVENTS = {
    zmq.EVENT_ACCEPTED: "connected",
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
}
TRANSPORT_EVENTS = ("connected", "disconnected", "handshake_failed")


class SocketMonitor:
    """Connection events of one socket, from libzmq's monitor (an inproc PAIR the I/O thread writes to).

    What the transport drops never reaches the application: a message part over ZMQ_MAXMSGSIZE makes
    libzmq close that connection (one ``disconnected``, no other trace), a CURVE peer the ZAP handler
    refuses fails its handshake. Counting these events is how such losses become visible."""

    def __init__(self, sock: zmq.Socket, name: str):
        self.name, self._sock = name, sock
        mask = 0
        for event in _EVENTS:
            mask |= event
        self.socket = sock.get_monitor_socket(mask)

    def drain(self) -> list[str]:
        """Names of the events that arrived since the last call."""
        out = []
        while True:
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return out
            if event in _EVENTS:
                out.append(_EVENTS[event])

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.disable_monitor()
        close_socket(self.socket)


def ipc_endpoint(runtime_dir: Path, name: str) -> str:
    endpoint = f"ipc://{Path(runtime_dir) / name}"
    if len(endpoint) - len("ipc://") > 100:
        raise ValueError(f"ipc path {endpoint} is too long for a unix socket; use a shorter runtime_dir")
    return endpoint


def send_msg(sock: zmq.Socket, obj: dict, flags: int = 0) -> None:
    sock.send(pack(obj), flags)


def recv_msg(sock: zmq.Socket, flags: int = 0) -> dict:
    """Receive one internal msgpack map (size-limited like everything else)."""
    return unpack_limited(sock.recv(flags), max_bytes=INTERNAL_MAX_BYTES, max_items=1 << 16)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CurveServer:
    """CURVE server keys from a zmq.auth secret key file, plus a ZAP allow-list of client public keys
    (every ``*.key`` file in ``clients_dir``). One authenticator per process that owns CURVE sockets."""

    def __init__(self, ctx: zmq.Context, server_secret: str, clients_dir: str):
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(server_secret)
        if secret is None:
            raise ValueError(f"{server_secret} holds no secret key")
        self.public, self.secret = public, secret
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(Path(clients_dir)))

    def secure(self, sock: zmq.Socket) -> zmq.Socket:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_server = True
        return sock

    def stop(self) -> None:
        self.auth.stop()


def secure_client(sock: zmq.Socket, client_secret: str, server_public: str) -> zmq.Socket:
    """Make ``sock`` a CURVE client: its own key pair file and the server's public key file."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(client_secret)
    server_key, _ = zmq.auth.load_certificate(server_public)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_key
    return sock
