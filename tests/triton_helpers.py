"""Helpers for the tests that run a real Triton server (the CPU tritonserver of nvidia-pytriton).

``server_env_or_skip`` builds the server's own virtualenv once per machine (engines.triton_local, cached under
$EDGE_INSPECT_CACHE or ~/.cache/edge-inspect); where that is impossible the tests skip with the reason, or
fail under CI (CI=true), where a skipped Triton test would hide that the backend went untested.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from edge_daemon.transport import free_tcp_port
from engines.base import BackendUnavailable, EngineError
from engines.triton_local import ServerEnv, TritonServer, build_server_env

__all__ = ["server_env_or_skip", "start_server", "self_signed_tls", "wait_for"]

_ENV: dict[str, ServerEnv] = {}


def server_env_or_skip() -> ServerEnv:
    """The built server environment (built on first use: about a minute of pip), or skip/fail with why."""
    if "env" not in _ENV:
        try:
            _ENV["env"] = build_server_env()
        except (BackendUnavailable, EngineError) as exc:
            reason = f"no Triton server environment: {exc}"
            if os.environ.get("CI"):
                pytest.fail(f"{reason} (CI must run the Triton tests)")
            pytest.skip(reason)
    return _ENV["env"]


def start_server(env: ServerEnv, repo: Path, log_path: Path, grpc_port: int | None = None,
                 http_port: int | None = None, tls: dict | None = None,
                 timeout_s: float = 90.0) -> TritonServer:
    """A started and ready server on loopback ports (free ones unless given)."""
    server = TritonServer(env, repo, grpc_port or free_tcp_port(), http_port or free_tcp_port(), log_path,
                          tls=tls)
    server.start()
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def self_signed_tls(directory: Path, host: str = "127.0.0.1") -> dict:
    """A self-signed server certificate for ``host`` made with the openssl command: {"cert", "key"}."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={host}", "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return {"cert": str(cert), "key": str(key)}


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """The first value of ``predicate()`` that is not None (TimeoutError past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:g} s")
