"""Daemon configuration: YAML parsed and validated once into frozen dataclasses.

Errors name the key and the problem: ``ConfigError("workers.count: must be >= 1, got 0")``. Relative paths
(``engine.bundle``, ``--bundle``) mean the current directory, as everywhere in edge-inspect; ``load_config``
makes the bundle path absolute, so child processes and log lines see where it really is. Nothing below
this module reads raw dicts, except the ``inspection`` mapping, which goes to
``InspectConfig.from_mapping`` (the pipeline owns its schema) merged with each camera's overrides.
The resolved config round-trips through ``to_mapping`` (JSON-safe), which is how child processes get it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from .cameras import camera_id_problem

__all__ = [
    "ConfigError",
    "DaemonConfig",
    "EngineSettings",
    "TritonSettings",
    "TlsSettings",
    "Endpoints",
    "MaxFrame",
    "QueueSettings",
    "CameraConfig",
    "CurveSettings",
    "load_config",
    "config_from_mapping",
    "camera_inspection_mapping",
    "check_key_permissions",
]

BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt", "triton")
TRITON_PROTOCOLS = ("grpc", "http")
PRECISIONS = (None, "auto", "fp32", "tf32", "fp16", "bf16", "int8")  # which backend runs which: engines.md
DROP_POLICIES = ("drop-oldest", "reject-newest")
INGEST_MODES = ("pull", "sub")
IMAGEZMQ_MODES = ("rep", "sub")
PROCESS_MODES = ("multi", "single")  # docs/architecture.md: one process per role, or one for all


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class TlsSettings:
    ca: str | None = None  # CA of the server certificate (None: the system's CAs)
    cert: str | None = None  # client certificate + key: mutual TLS
    key: str | None = None


@dataclass(frozen=True)
class TritonSettings:
    """engine.triton: where backend triton sends batches (docs/scale-out.md)."""

    url: str  # host:port
    model: str
    protocol: str = "grpc"
    timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    tls: TlsSettings | None = None


@dataclass(frozen=True)
class EngineSettings:
    bundle: str
    backend: str = "auto"
    device: str | None = None
    precision: str | None = None
    streams: int = 2
    max_batch: int = 16
    max_delay_us: int = 2000
    threads: int | None = None
    cache_dir: str | None = None
    triton: TritonSettings | None = None

    def backend_options(self) -> dict:
        """Backend-specific keyword options of engines.open_engine (only triton has any)."""
        if self.triton is None:
            return {}
        t, tls = self.triton, self.triton.tls
        return {"url": t.url, "model": t.model, "protocol": t.protocol, "timeout_s": t.timeout_s,
                "connect_timeout_s": t.connect_timeout_s, "tls": tls is not None,
                "tls_ca": tls and tls.ca, "tls_cert": tls and tls.cert, "tls_key": tls and tls.key}


@dataclass(frozen=True)
class Endpoints:
    ingest: str = "tcp://*:5555"
    ingest_mode: str = "pull"  # pull (bind) or sub (connect)
    imagezmq: str | None = None
    imagezmq_mode: str = "rep"  # rep (bind, answers b'OK') or sub (connect to an imagezmq PUB)
    output: str = "tcp://*:5556"
    metrics_port: int | None = 9100  # None: no HTTP metrics
    metrics_host: str = "127.0.0.1"
    output_hwm: int = 10000  # records queued per subscriber; a slower one loses records past it (seq gap)


@dataclass(frozen=True)
class MaxFrame:
    width: int = 2448
    height: int = 2048
    channels: int = 3
    bytes_per_sample: int = 1

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.channels * self.bytes_per_sample


@dataclass(frozen=True)
class QueueSettings:
    slots: int = 32  # shared-memory slots (frames that can exist at once)
    size: int = 16  # frames waiting for a worker
    drop_policy: str = "drop-oldest"
    worker_credit: int = 8  # frames one worker holds at once


@dataclass(frozen=True)
class CameraConfig:
    id: str
    threshold: float | None = None  # image threshold override
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h
    ignore: tuple[tuple[int, int, int, int], ...] = ()  # ignore zones, x, y, w, h each


@dataclass(frozen=True)
class CurveSettings:
    server_secret: str  # zmq.auth secret key file of the daemon (holds public and secret key)
    clients_dir: str  # directory of allowed client public key files (*.key)
    on_ingest: bool = True
    on_output: bool = True


@dataclass(frozen=True)
class DaemonConfig:
    engine: EngineSettings
    endpoints: Endpoints = field(default_factory=Endpoints)
    workers: int = 1
    max_frame: MaxFrame = field(default_factory=MaxFrame)
    queue: QueueSettings = field(default_factory=QueueSettings)
    cameras: tuple[CameraConfig, ...] = ()
    inspection: dict = field(default_factory=dict)
    curve: CurveSettings | None = None
    instance: str = "edge"
    runtime_dir: str | None = None  # ipc sockets and lock; default $TMPDIR/edge-inspect-<instance>
    shutdown_timeout_s: float = 10.0
    map_downscale: int = 0  # 0: no anomaly maps published; k: publish every map down-scaled by k
    log_format: str = "kv"
    log_level: str = "INFO"
    process_mode: str = "multi"  # multi: ingest, workers, publisher in processes; single: one process

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir or Path(tempfile.gettempdir()) / f"edge-inspect-{self.instance}")

    def camera(self, camera_id: str) -> CameraConfig | None:
        return next((c for c in self.cameras if c.id == camera_id), None)

    def to_mapping(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def with_bundle(self, bundle: str | None) -> DaemonConfig:
        return self if not bundle else replace(self, engine=replace(self.engine, bundle=str(bundle)))


# ---- validation helpers: each names the key -------------------------------------------------------------


def _fail(key: str, problem: str):
    raise ConfigError(f"{key}: {problem}")


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(f"{where}{key}", f"must be a mapping, got {type(value).__name__}")
    return value


def _no_extra(data: dict, allowed, where: str) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        _fail(f"{where}{extra[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _int(data: dict, key: str, where: str, default, lo: int | None = None, optional: bool = False):
    value = data.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(f"{where}{key}", f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        _fail(f"{where}{key}", f"must be >= {lo}, got {value}")
    return value


def _num(data: dict, key: str, where: str, default, lo: float = 0.0, optional: bool = False):
    value = data.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(f"{where}{key}", f"must be a number, got {value!r}")
    if value < lo:
        _fail(f"{where}{key}", f"must be >= {lo}, got {value}")
    return float(value)


def _str(data: dict, key: str, where: str, default, choices=None, optional: bool = False):
    value = data.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        _fail(f"{where}{key}", f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        _fail(f"{where}{key}", f"must be one of {', '.join(str(c) for c in choices if c)}, got {value!r}")
    return value


def _rect(value, key: str) -> tuple[int, int, int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        _fail(key, f"must be [x, y, w, h] integers, got {value!r}")
    if value[0] < 0 or value[1] < 0 or value[2] <= 0 or value[3] <= 0:
        _fail(key, f"needs x, y >= 0 and w, h > 0, got {list(value)}")
    return tuple(value)


# ---- sections -------------------------------------------------------------------------------------------


def _tls(sec: dict, base_dir: Path | None) -> TlsSettings | None:
    if sec.get("tls") is None:
        return None
    w = "engine.triton.tls."
    tls = _section(sec, "tls", "engine.triton.")
    _no_extra(tls, TlsSettings.__dataclass_fields__, w)
    paths = {}
    for key in ("ca", "cert", "key"):
        value = _str(tls, key, w, None, optional=True)
        if value is not None and base_dir is not None and not Path(value).is_absolute():
            value = str((base_dir / value).resolve())
        if value is not None and not Path(value).is_file():
            _fail(f"{w}{key}", f"file {value} does not exist")
        paths[key] = value
    if (paths["cert"] is None) != (paths["key"] is None):
        _fail(f"{w}cert", "cert and key come together (mutual TLS) or not at all")
    return TlsSettings(**paths)


def _triton(sec: dict, backend: str, base_dir: Path | None) -> TritonSettings | None:
    if sec.get("triton") is None:
        if backend == "triton":
            _fail("engine.triton", "is required with backend triton (url, model; docs/scale-out.md)")
        return None
    if backend != "triton":
        _fail("engine.triton", f"applies to backend triton only, backend is {backend!r}")
    w = "engine.triton."
    tri = _section(sec, "triton", "engine.")
    _no_extra(tri, TritonSettings.__dataclass_fields__, w)
    url = _str(tri, "url", w, None)
    if "://" in url or ":" not in url:
        _fail(f"{w}url", f"must be host:port without a scheme, got {url!r}")
    return TritonSettings(
        url=url,
        model=_str(tri, "model", w, None),
        protocol=_str(tri, "protocol", w, "grpc", TRITON_PROTOCOLS),
        timeout_s=_num(tri, "timeout_s", w, 5.0, lo=0.001),
        connect_timeout_s=_num(tri, "connect_timeout_s", w, 5.0, lo=0.001),
        tls=_tls(tri, base_dir),
    )


def _engine(data: dict, base_dir: Path | None = None) -> EngineSettings:
    w = "engine."
    sec = _section(data, "engine", "")
    _no_extra(sec, EngineSettings.__dataclass_fields__, w)
    if "bundle" not in sec:
        _fail("engine.bundle", "is required (path of the model bundle directory)")
    precision = sec.get("precision")
    if precision not in PRECISIONS:
        _fail("engine.precision",
              f"must be auto, fp32, tf32, fp16, bf16 or int8 (or absent), got {precision!r}")
    backend = _str(sec, "backend", w, "auto", BACKENDS)
    return EngineSettings(
        bundle=_str(sec, "bundle", w, None),
        backend=backend,
        device=_str(sec, "device", w, None, optional=True),
        precision=precision,
        streams=_int(sec, "streams", w, 2, 1),
        max_batch=_int(sec, "max_batch", w, 16, 1),
        max_delay_us=_int(sec, "max_delay_us", w, 2000, 0),
        threads=_int(sec, "threads", w, None, 1, True),
        cache_dir=_str(sec, "cache_dir", w, None, optional=True),
        triton=_triton(sec, backend, base_dir),
    )


def _endpoints(data: dict) -> Endpoints:
    w = "endpoints."
    sec = _section(data, "endpoints", "")
    _no_extra(sec, Endpoints.__dataclass_fields__, w)
    port = _int(sec, "metrics_port", w, 9100, 0, optional=True)
    if port is not None and port > 65535:
        _fail("endpoints.metrics_port", f"must be <= 65535, got {port}")
    out = Endpoints(
        ingest=_str(sec, "ingest", w, "tcp://*:5555"),
        ingest_mode=_str(sec, "ingest_mode", w, "pull", INGEST_MODES),
        imagezmq=_str(sec, "imagezmq", w, None, optional=True),
        imagezmq_mode=_str(sec, "imagezmq_mode", w, "rep", IMAGEZMQ_MODES),
        output=_str(sec, "output", w, "tcp://*:5556"),
        metrics_port=port,
        metrics_host=_str(sec, "metrics_host", w, "127.0.0.1"),
        output_hwm=_int(sec, "output_hwm", w, 10000, 1),
    )
    for key in ("ingest", "imagezmq", "output"):
        value = getattr(out, key)
        if value is not None and "://" not in value:
            _fail(f"endpoints.{key}", f"must be a ZeroMQ endpoint like tcp://*:5555, got {value!r}")
    return out


def _max_frame(data: dict) -> MaxFrame:
    w = "max_frame."
    sec = _section(data, "max_frame", "")
    _no_extra(sec, MaxFrame.__dataclass_fields__, w)
    out = MaxFrame(
        width=_int(sec, "width", w, 2448, 1),
        height=_int(sec, "height", w, 2048, 1),
        channels=_int(sec, "channels", w, 3, 1),
        bytes_per_sample=_int(sec, "bytes_per_sample", w, 1, 1),
    )
    if out.channels not in (1, 3):
        _fail("max_frame.channels", f"must be 1 or 3, got {out.channels}")
    if out.bytes_per_sample not in (1, 2):
        _fail("max_frame.bytes_per_sample", f"must be 1 or 2, got {out.bytes_per_sample}")
    return out


def _queue(data: dict, workers: int) -> QueueSettings:
    w = "queue."
    sec = _section(data, "queue", "")
    _no_extra(sec, QueueSettings.__dataclass_fields__, w)
    out = QueueSettings(
        slots=_int(sec, "slots", w, 32, 2),
        size=_int(sec, "size", w, 16, 1),
        drop_policy=_str(sec, "drop_policy", w, "drop-oldest", DROP_POLICIES),
        worker_credit=_int(sec, "worker_credit", w, 8, 1),
    )
    if out.slots <= out.size:
        _fail(
            "queue.slots",
            f"must be > queue.size ({out.size}) so that a frame being received always "
            f"finds a slot, got {out.slots}",
        )
    return out


def _cameras(data: dict) -> tuple[CameraConfig, ...]:
    raw = data.get("cameras", []) or []
    if not isinstance(raw, list):
        _fail("cameras", f"must be a list, got {type(raw).__name__}")
    out, seen = [], set()
    for i, cam in enumerate(raw):
        w = f"cameras[{i}]."
        if not isinstance(cam, dict):
            _fail(f"cameras[{i}]", "must be a mapping with at least 'id'")
        _no_extra(cam, CameraConfig.__dataclass_fields__, w)
        cid = _str(cam, "id", w, None)
        problem = camera_id_problem(cid)
        if problem:
            _fail(f"{w}id", f"{problem}, got {cid!r}")
        if cid in seen:
            _fail(f"{w}id", f"duplicate camera id {cid!r}")
        seen.add(cid)
        roi = None if cam.get("roi") is None else _rect(cam["roi"], f"{w}roi")
        ignore = cam.get("ignore", []) or []
        if not isinstance(ignore, list):
            _fail(f"{w}ignore", "must be a list of [x, y, w, h]")
        zones = tuple(_rect(z, f"{w}ignore[{j}]") for j, z in enumerate(ignore))
        out.append(
            CameraConfig(
                id=cid, threshold=_num(cam, "threshold", w, None, optional=True), roi=roi, ignore=zones
            )
        )
    return tuple(out)


def _curve(data: dict) -> CurveSettings | None:
    sec = data.get("curve")
    if sec is None:
        return None
    if not isinstance(sec, dict):
        _fail("curve", "must be a mapping")
    w = "curve."
    _no_extra(sec, CurveSettings.__dataclass_fields__, w)
    out = CurveSettings(
        server_secret=_str(sec, "server_secret", w, None),
        clients_dir=_str(sec, "clients_dir", w, None),
        on_ingest=bool(sec.get("on_ingest", True)),
        on_output=bool(sec.get("on_output", True)),
    )
    if not Path(out.server_secret).is_file():
        _fail("curve.server_secret", f"file {out.server_secret} does not exist")
    if not Path(out.clients_dir).is_dir():
        _fail("curve.clients_dir", f"directory {out.clients_dir} does not exist")
    check_key_permissions(out)
    return out


def check_key_permissions(curve: CurveSettings) -> None:
    """Refuse keys others could read (the secret key) or change (the allow-list): ConfigError names them."""
    mode = Path(curve.server_secret).stat().st_mode & 0o777
    if mode & 0o077:
        _fail(
            "curve.server_secret",
            f"secret key file {curve.server_secret} has mode {mode:04o}: readable or writable by group or "
            f"others; run chmod 600 on it",
        )
    paths = [Path(curve.clients_dir), *sorted(Path(curve.clients_dir).glob("*.key"))]
    for path in paths:
        mode = path.stat().st_mode & 0o777
        if mode & 0o022:
            _fail(
                "curve.clients_dir",
                f"{path} has mode {mode:04o}: writable by group or others, anyone could add a client key",
            )


TOP_KEYS = (
    "engine",
    "endpoints",
    "workers",
    "max_frame",
    "queue",
    "cameras",
    "inspection",
    "curve",
    "instance",
    "runtime_dir",
    "shutdown_timeout_s",
    "map_downscale",
    "log_format",
    "log_level",
    "process_mode",
)


def config_from_mapping(data: dict, base_dir: Path | None = None) -> DaemonConfig:
    """Validate a parsed YAML mapping; a relative engine.bundle is resolved against base_dir when given."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: must be a mapping at the top level, got {type(data).__name__}")
    _no_extra(data, TOP_KEYS, "")
    workers = (
        _section(data, "workers", "")
        if isinstance(data.get("workers"), dict)
        else {"count": data.get("workers", 1)}
    )
    _no_extra(workers, ("count",), "workers.")
    count = _int(workers, "count", "workers.", 1, 1)
    engine = _engine(data, base_dir)
    if base_dir is not None and not Path(engine.bundle).is_absolute():
        engine = replace(engine, bundle=str((base_dir / engine.bundle).resolve()))
    inspection = data.get("inspection", {}) or {}
    if not isinstance(inspection, dict):
        _fail("inspection", "must be a mapping")
    mode = _str(data, "process_mode", "", "multi", PROCESS_MODES)
    if mode == "single" and count != 1:
        _fail("process_mode", f"single runs exactly one worker (workers.count 1), got {count}")
    instance = _str(data, "instance", "", "edge")
    if not instance.replace("-", "").replace("_", "").isalnum() or len(instance) > 32:
        _fail("instance", f"must be <= 32 letters, digits, '-' or '_', got {instance!r}")
    return DaemonConfig(
        engine=engine,
        endpoints=_endpoints(data),
        workers=count,
        max_frame=_max_frame(data),
        queue=_queue(data, count),
        cameras=_cameras(data),
        inspection=copy.deepcopy(inspection),
        curve=_curve(data),
        instance=instance,
        runtime_dir=_str(data, "runtime_dir", "", None, optional=True),
        shutdown_timeout_s=_num(data, "shutdown_timeout_s", "", 10.0, lo=0.1),
        map_downscale=_int(data, "map_downscale", "", 0, 0),
        log_format=_str(data, "log_format", "", "kv", ("kv", "json")),
        log_level=_str(data, "log_level", "", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        process_mode=mode,
    )


def load_config(path: str | Path, bundle: str | None = None) -> DaemonConfig:
    """Read and validate a YAML config file; ``bundle`` overrides engine.bundle. Relative paths (in the file
    and ``bundle``) are relative to the current directory, not to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and bundle:
        data = {**data, "engine": {**(data.get("engine") or {}), "bundle": str(bundle)}}
    return config_from_mapping(data, base_dir=Path.cwd())


def camera_inspection_mapping(cfg: DaemonConfig, camera_id: str, keys: dict[str, str] | None = None) -> dict:
    """The inspection mapping for one camera: the global one with the camera's overrides applied.

    ``keys`` maps our camera fields (threshold, roi, ignore) to the pipeline's InspectConfig keys.
    """
    keys = keys or {"threshold": "image_threshold", "roi": "roi", "ignore": "ignore_zones"}
    mapping = copy.deepcopy(cfg.inspection)
    cam = cfg.camera(camera_id)
    if cam is None:
        return mapping
    if cam.threshold is not None:
        mapping[keys["threshold"]] = cam.threshold
    if cam.roi is not None:
        mapping[keys["roi"]] = list(cam.roi)
    if cam.ignore:
        mapping[keys["ignore"]] = [list(z) for z in cam.ignore]
    return mapping
