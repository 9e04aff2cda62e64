"""The CPU Triton Inference Server bundled in nvidia-pytriton: its own virtualenv, started on a repository.

For development, CI and small CPU pools (`edge-engines triton-serve`, the tests); GPU pools run NVIDIA's own
Triton server. Why a virtualenv of its own:
- the server's Python backend stub embeds the shared libpython of the interpreter that made the virtualenv and
  finds that virtualenv through PATH; the stub shipped in the wheel links the Debian system Python's
  ``libpython3.11.so.1.0``, so the virtualenv is made with ``/usr/bin/python3.11`` (a pyenv-built Python
  fails inside the stub);
- nvidia-pytriton pins numpy<2, which the project's environment does not.

``build_server_env(dir)`` creates ``dir`` once (idempotent; built under a temporary name and renamed, so a
half-built one is never used): ``venv/`` (SERVER_REQUIREMENTS), ``server/`` (the tritonserver binary, its
backends with the Python stub for the venv's Python, caches) and ``READY`` (JSON: requirements, seconds).
``TritonServer`` runs the binary on a repository bound to one address, waits for /v2/health/ready, and stops
or kills the process group it started.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .base import BackendUnavailable, EngineError

__all__ = ["SERVER_REQUIREMENTS", "SYSTEM_PYTHON", "ServerEnv", "TritonServer", "build_server_env",
           "default_server_dir", "missing_prerequisite", "server_command", "serve_foreground"]

SERVER_REQUIREMENTS = ("nvidia-pytriton==0.7.0", "onnxruntime>=1.17")
SYSTEM_PYTHON = "/usr/bin/python3.11"
_READY = "READY"


def default_server_dir(requirements: tuple[str, ...] = SERVER_REQUIREMENTS) -> Path:
    """$EDGE_INSPECT_CACHE/triton-server-<hash of the requirements> (default ~/.cache/edge-inspect/...)."""
    root = Path(os.environ.get("EDGE_INSPECT_CACHE", "~/.cache/edge-inspect")).expanduser()
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    return root / f"triton-server-{digest}"


def missing_prerequisite(python: str = SYSTEM_PYTHON) -> str | None:
    """None when ``python`` can host the server's Python backend, else why not (one line)."""
    if not Path(python).is_file():
        return f"{python} does not exist (the server's Python stub needs the Debian system Python 3.11)"
    probe = ("import sysconfig, pathlib; d = sysconfig.get_config_var('LIBDIR'); "
             "n = sysconfig.get_config_var('INSTSONAME') or ''; print(pathlib.Path(d, n).is_file() and "
             "bool(sysconfig.get_config_var('Py_ENABLE_SHARED')))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} cannot be run: {exc}"
    if out != "True":
        return f"{python} has no shared libpython (the server's Python stub links it)"
    return None


@dataclass(frozen=True)
class ServerEnv:
    """A built server directory."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def binary(self) -> Path:
        return self.root / "server" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "server" / "backends"

    @property
    def caches(self) -> Path:
        return self.root / "server" / "caches"

    @property
    def libs(self) -> Path:
        return next(self.venv.glob("lib/python3*/site-packages/nvidia_pytriton.libs"))

    def environment(self, base: dict | None = None) -> dict:
        """The server's environment: the venv first on PATH (the stub finds its Python there), its libs."""
        env = {k: v for k, v in (base if base is not None else os.environ).items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(self.libs), env.get("LD_LIBRARY_PATH")]))
        return env


def _run(cmd: list[str], what: str, timeout_s: float) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{what}: no result within {timeout_s:g} s") from exc
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise EngineError(f"{what} failed (exit {done.returncode}): {' | '.join(lines[-3:])}")


def _lay_out_server(venv: Path, server: Path) -> None:
    """Copy the wheel's tritonserver tree and put the Python stub of the venv's Python in its backend."""
    site = next(venv.glob("lib/python3*/site-packages"))
    dist = site / "pytriton" / "tritonserver"
    version = site.parent.name.removeprefix("python")
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise EngineError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")


def build_server_env(root: str | Path | None = None, python: str = SYSTEM_PYTHON,
                     requirements: tuple[str, ...] = SERVER_REQUIREMENTS,
                     timeout_s: float = 1200.0) -> ServerEnv:
    """The server directory at ``root`` (default ``default_server_dir``), built first if it is not there."""
    root = Path(root) if root is not None else default_server_dir(requirements)
    if (root / _READY).is_file():
        return ServerEnv(root)
    why = missing_prerequisite(python)
    if why:
        raise BackendUnavailable(f"cannot build the Triton server environment: {why}")
    start = time.monotonic()
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _run([python, "-m", "venv", str(tmp / "venv")], f"{python} -m venv", 300)
        pip = [str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q"]
        _run([*pip, *requirements], f"pip install {' '.join(requirements)} into the server venv", timeout_s)
        _lay_out_server(tmp / "venv", tmp / "server")
        (tmp / _READY).write_text(json.dumps({"requirements": list(requirements), "python": python,
                                              "seconds": round(time.monotonic() - start, 1)}) + "\n")
        try:
            tmp.rename(root)
        except OSError as exc:  # another process finished first: use its directory
            if not (root / _READY).is_file():
                raise EngineError(f"{root} exists but is not a finished server directory (no {_READY}): "
                                  "remove it") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ServerEnv(root)


def server_command(env: ServerEnv, repo: Path, grpc_port: int, http_port: int, host: str = "127.0.0.1",
                   tls: dict | None = None, log_verbose: int = 0) -> list[str]:
    """tritonserver arguments: the repository as written (no auto-completed config), metrics off.

    ``tls``: {"cert", "key"} (and "ca" for mutual TLS) switches the gRPC endpoint to TLS."""
    cmd = [str(env.binary), f"--model-repository={repo}", f"--backend-directory={env.backends}",
           f"--cache-directory={env.caches}", "--disable-auto-complete-config", "--allow-metrics=false",
           f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--http-address={host}",
           f"--http-port={http_port}", "--exit-timeout-secs=5", f"--log-verbose={log_verbose}"]
    if tls:
        cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={tls['cert']}", f"--grpc-server-key={tls['key']}"]
        if tls.get("ca"):
            cmd += [f"--grpc-root-cert={tls['ca']}", "--grpc-use-ssl-mutual=true"]
    return cmd


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it exits (no orphaned servers)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TritonServer:
    """One tritonserver process (its own process group) with its log in a file."""

    def __init__(self, env: ServerEnv, repo: str | Path, grpc_port: int, http_port: int, log_path: str | Path,
                 host: str = "127.0.0.1", tls: dict | None = None):
        self.env, self.repo, self.host = env, Path(repo), host
        self.grpc_port, self.http_port, self.log_path = grpc_port, http_port, Path(log_path)
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def start(self) -> TritonServer:
        if self.proc is not None and self.proc.poll() is None:
            raise EngineError(f"tritonserver already running (pid {self.proc.pid})")
        cmd = server_command(self.env, self.repo, self.grpc_port, self.http_port, self.host, self.tls)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env.environment(), start_new_session=True,
                                         preexec_fn=_die_with_parent)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def ready(self) -> bool:
        try:
            url = f"http://{self.host}:{self.http_port}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> TritonServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise EngineError(f"tritonserver exited (code {code}) before it was ready:\n{self._tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        raise EngineError(f"tritonserver not ready within {timeout_s:g} s:\n{self._tail()}")

    def _tail(self, lines: int = 25) -> str:
        keep = [ln for ln in self.logs().splitlines() if ln.strip() and not ln.startswith(("+", "|"))]
        return "\n".join(keep[-lines:])

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group this process leads: the server and its Python stubs
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its stubs now (a crash, as the tests need it)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait for the exit, then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def __enter__(self) -> TritonServer:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_foreground(env: ServerEnv, repo: Path, grpc_port: int, http_port: int, host: str,
                     tls: dict | None) -> None:
    """Replace this process with the server (for systemd or a terminal: signals go straight to it)."""
    cmd = server_command(env, repo, grpc_port, http_port, host, tls)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env.environment())
