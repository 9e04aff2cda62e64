"""Security: CURVE through the real daemon (unknown keys can neither inject frames nor read verdicts), key
file permissions, no pickle / eval / shell in the daemon's code, msgpack limits, the systemd unit's
hardening."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml
import zmq
import zmq.auth
from daemon_helpers import DaemonProcess, accounting, collect, daemon_config, handshake, wait_until

from edge_daemon.cli import main as daemon_cli
from edge_daemon.client import CurveClientKeys, FramePublisher, VerdictSubscriber
from edge_daemon.config import ConfigError, config_from_mapping
from edge_daemon.protocol import ProtocolError, decode_header

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("onnxruntime")


@pytest.fixture
def keys(tmp_path):
    """zmq.auth key pairs: server, an allowed client ("good") and an unknown one ("bad")."""
    certs, allowed = tmp_path / "certs", tmp_path / "allowed"
    certs.mkdir()
    allowed.mkdir(mode=0o700)
    for name in ("server", "good", "bad"):
        zmq.auth.create_certificates(str(certs), name)
    os.chmod(certs / "server.key_secret", 0o600)  # zmq.auth writes 0644: the daemon refuses that
    (allowed / "good.key").write_text((certs / "good.key").read_text())
    return certs, allowed


def _curve(certs: Path, allowed: Path) -> dict:
    return {"server_secret": str(certs / "server.key_secret"), "clients_dir": str(allowed)}


def _client(certs: Path, name: str) -> CurveClientKeys:
    return CurveClientKeys(str(certs / f"{name}.key_secret"), str(certs / "server.key"))


@pytest.mark.parametrize("mode", ["multi", "single"])  # single: one ZAP authenticator for both sockets
def test_curve_through_the_daemon(tmp_path, tiny_bundle, keys, mode):
    certs, allowed = keys
    path, data = daemon_config(
        tmp_path, tiny_bundle, map_downscale=0, curve=_curve(certs, allowed), process_mode=mode
    )
    ep = data["endpoints"]
    proc = DaemonProcess(path, tmp_path / "d.log", instance=data["instance"])
    good, bad = _client(certs, "good"), _client(certs, "bad")
    frame = np.zeros((32, 32), np.uint8)
    try:
        proc.wait_ready(ep["metrics_port"], timeout_s=60)
        with (
            VerdictSubscriber(ep["output"], curve=good) as sub,
            VerdictSubscriber(ep["output"], curve=bad) as spy,
            VerdictSubscriber(ep["output"]) as plain_spy,
            FramePublisher(ep["ingest"], "cam1", curve=good, send_timeout_s=5) as cam,
        ):
            records, probes = handshake(cam, sub, frame)
            assert records[0].kind == "verdict" and records[0].camera_id == "cam1"
            # unknown key and no key at all: frames never get in
            for curve in (bad, None):
                with FramePublisher(ep["ingest"], "intruder", curve=curve, send_timeout_s=0.3) as evil:
                    for i in range(5):
                        try:
                            evil.send(frame, frame_id=i)
                        except TimeoutError:
                            break  # never connected: nothing gets in either way
            fids = [cam.send(frame) for _ in range(5)]
            got = collect(sub, 100, 15.0, until=lambda r: any(v.frame_id == fids[-1] for v in r))
            assert {v.frame_id for v in got} >= set(fids)
            assert all(v.camera_id == "cam1" for v in records + got)  # no intruder record at all
            assert spy.recv(0.5) is None and plain_spy.recv(0.1) is None  # verdicts unreadable

        def counted():
            a = accounting(ep["metrics_port"])
            return a if a["received"] == len(probes) + len(fids) else None

        a = wait_until(counted, 10.0, 0.2, "received counts only the allowed camera")
        assert not [k for k in a["_raw"] if "intruder" in k]
        assert a["_raw"]['edge_transport_events_total{event="handshake_failed",socket="frames"}'] >= 2
        assert proc.terminate(timeout_s=30) == 0
    finally:
        proc.stop()


def test_unsafe_key_permissions_refused(tmp_path, tiny_bundle, keys):
    certs, allowed = keys
    base = {"engine": {"bundle": str(tiny_bundle)}, "curve": _curve(certs, allowed)}
    assert config_from_mapping(base).curve is not None
    os.chmod(certs / "server.key_secret", 0o644)
    with pytest.raises(ConfigError, match=r"curve.server_secret: .*mode 0644.*chmod 600"):
        config_from_mapping(base)
    # edge-daemon run refuses to start: exit 2, before any process or socket exists
    path, data = daemon_config(tmp_path, tiny_bundle, curve=_curve(certs, allowed))
    assert daemon_cli(["run", "--config", str(path)]) == 2
    assert daemon_cli(["check-config", str(path)]) == 2
    os.chmod(certs / "server.key_secret", 0o600)
    os.chmod(allowed, 0o777)  # anyone could drop a key in the allow-list
    with pytest.raises(ConfigError, match="curve.clients_dir: .*writable by group or others"):
        config_from_mapping(base)
    os.chmod(allowed, 0o700)
    os.chmod(allowed / "good.key", 0o666)
    with pytest.raises(ConfigError, match="good.key has mode 0666"):
        config_from_mapping(base)


# ---- no pickle, no eval, no shell -----------------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_OS = {"system", "popen", "execl", "execlp", "execv", "execvp", "spawnl", "spawnv"}


def _daemon_sources() -> list[Path]:
    """The daemon's runtime modules (every input path); bench/ holds benchmark tools, not the daemon."""
    return sorted((ROOT / "edge_daemon").glob("*.py"))


@pytest.mark.parametrize("path", _daemon_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_eval_or_shell(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, ast.dump(node)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, node.module
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        assert not (isinstance(func, ast.Name) and name in FORBIDDEN_BUILTINS), f"{path.name}:{node.lineno}"
        assert not (owner == "os" and name in FORBIDDEN_OS), f"{path.name}:{node.lineno} os.{name}"
        for kw in node.keywords:
            value = kw.value
            truthy = isinstance(value, ast.Constant) and value.value is True
            assert not (kw.arg == "shell" and truthy), f"{path.name}:{node.lineno} shell=True"
            assert not (kw.arg == "allow_pickle" and truthy), f"{path.name}:{node.lineno} allow_pickle"
        assert not (name == "load" and owner in ("yaml", "torch")), f"{path.name}:{node.lineno} {owner}.load"
        if name == "unpackb":  # msgpack: every decode of peer data has limits
            kws = {kw.arg for kw in node.keywords}
            assert "max_bin_len" in kws or None in kws, f"{path.name}:{node.lineno} unpackb without limits"


def test_msgpack_limits():
    with pytest.raises(ProtocolError, match="limit 4096"):
        decode_header(msgpack.packb({"camera_id": "x" * 5000}))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_header(b"\x91" * 3000 + b"\x01")  # 3000 nested arrays
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_header(msgpack.packb({f"k{i}": i for i in range(100)}))  # more than 64 entries
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_header(b"\xdb\xff\xff\xff\xff")  # claims a 4 GB string
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_header(msgpack.packb(msgpack.ExtType(1, b"x")))  # no extension types


# ---- the systemd unit: unprivileged and hardened --------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for line in (ROOT / "systemd" / "edge-inspect.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith(("#", ";")) and section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_unprivileged_and_hardened():
    svc = _unit()
    assert svc["User"][0] not in ("root", "0") and svc["Group"][0] not in ("root", "0")
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["CapabilityBoundingSet"] == [""] and svc["AmbientCapabilities"] == [""]
    for key in ("ProtectSystem",):
        assert svc[key] == ["strict"]
    for key in (
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "LockPersonality",
        "RemoveIPC",
    ):
        assert svc[key] == ["yes"], key
    assert svc["UMask"] == ["0077"] and svc["RuntimeDirectoryMode"] == ["0700"]
    assert set(svc["RestrictAddressFamilies"][0].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert svc["SystemCallFilter"] and svc["SystemCallFilter"][0].startswith("~")
    for key in ("ExecStart", "ExecStartPre"):  # no "+" / "!" prefixes: nothing runs with privileges
        assert all(not cmd.startswith(("+", "!", "-+")) for cmd in svc[key]), svc[key]
    assert svc["DevicePolicy"] == ["closed"]


def test_example_config_is_safe_by_default():
    data = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())
    assert data["endpoints"]["metrics_host"] == "127.0.0.1"  # metrics not exposed on the network
