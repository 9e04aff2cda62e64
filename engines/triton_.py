"""Triton backend: tile batches go to a model on a Triton Inference Server through tritonclient.

The bundle stays on the line PC (geometry, thresholds, fusion); only the engine call crosses the network:
uint8 B x H x W x C tiles out, float32 B x 1 x h x w maps back, over gRPC or HTTP (optionally TLS).

Slots: one thread and one client connection per slot (``streams`` requests in flight); ``submit`` returns a
concurrent.futures.Future, ``infer`` is ``submit(tiles, 0).result()``. Every call is bounded: ``timeout_s``
per inference, ``connect_timeout_s`` per metadata call, so a dead or stuck server fails the batch with an
EngineError (the daemon turns it into error records for that batch's frames) instead of hanging.

Reconnects: a slot whose call failed drops its client; its next call makes a new connection and checks the
model's config.pbtxt again (``check_model_config``): tensor names from the config, dtype and dims equal to
the bundle's, max_batch_size >= max_batch, and the edge_inspect_model_id / edge_inspect_precision parameters
written by ``triton-repo`` equal to the bundle's model id and the requested precision. A mismatch is
``ModelMismatch``: fatal at open (the daemon refuses to start), an error per batch afterwards. A server that
cannot be reached at open is not fatal: a warning is logged and batches fail until it answers.
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import (
    BackendUnavailable,
    BundleGeometry,
    EngineError,
    EngineInputError,
    SlotPool,
    batch_buckets,
    check_tiles,
)
from .bundle import BundleMeta
from .triton_repo import MODEL_ID_KEY, PRECISION_KEY

__all__ = ["PROTOCOLS", "TritonTarget", "ServerModel", "ModelMismatch", "TritonEngine", "check_model_config",
           "open_backend"]

log = logging.getLogger(__name__)
PROTOCOLS = ("grpc", "http")


class ModelMismatch(EngineError):
    """The server's model does not fit the bundle (names, dims, batch, model id or precision)."""


@dataclass(frozen=True)
class TritonTarget:
    """Where the model is and how to reach it."""

    url: str  # host:port, no scheme
    model: str
    protocol: str = "grpc"
    timeout_s: float = 5.0  # one inference request
    connect_timeout_s: float = 5.0  # connection and metadata calls
    tls: bool = False
    tls_ca: str | None = None  # PEM of the CA that signed the server certificate (None: system CAs)
    tls_cert: str | None = None  # client certificate and key, for mutual TLS
    tls_key: str | None = None

    @property
    def where(self) -> str:
        scheme = {"grpc": "grpcs", "http": "https"}[self.protocol] if self.tls else self.protocol
        return f"triton {scheme}://{self.url} model {self.model!r}"


@dataclass(frozen=True)
class ServerModel:
    """What the engine uses of the server's model config."""

    input_name: str
    output_name: str
    max_batch: int
    model_id: str | None
    precision: str | None


def _params(config: dict) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


def _tensor(config: dict, key: str, dtype: str, dims: tuple[int, ...]) -> str:
    tensors = config.get(key) or []
    if len(tensors) != 1:
        raise ModelMismatch(f"model has {len(tensors)} {key}s, the bundle graph has 1")
    tensor = tensors[0]
    got = tuple(int(d) for d in tensor.get("dims", []))
    if tensor.get("data_type") != dtype or got != dims:
        raise ModelMismatch(f"model {key} {tensor.get('name')!r} is {tensor.get('data_type')} {list(got)}, "
                            f"the bundle needs {dtype} {list(dims)}")
    return tensor["name"]


def check_model_config(config: dict, meta: BundleMeta, max_batch: int, precision: str | None) -> ServerModel:
    """The server's model config (JSON form) checked against the bundle; ModelMismatch says what differs."""
    tile = (meta.input.height, meta.input.width, meta.input.channels)
    input_name = _tensor(config, "input", "TYPE_UINT8", tile)
    output_name = _tensor(config, "output", "TYPE_FP32", (1, meta.map.height, meta.map.width))
    server_batch = int(config.get("max_batch_size", 0))
    if server_batch < max_batch:
        raise ModelMismatch(f"model max_batch_size is {server_batch}, the engine sends batches of up to "
                            f"{max_batch} (lower engine.max_batch or regenerate the repository)")
    params = _params(config)
    model_id, server_precision = params.get(MODEL_ID_KEY), params.get(PRECISION_KEY)
    if model_id is not None and model_id != meta.model_id:
        raise ModelMismatch(f"server model is {model_id}, the bundle is {meta.model_id} (deploy the same "
                            "bundle on both sides)")
    if precision is not None and server_precision is not None and precision != server_precision:
        raise ModelMismatch(f"server model runs {server_precision}, {precision} was asked for")
    return ServerModel(input_name, output_name, server_batch, model_id, server_precision)


def _reason(exc: Exception) -> str:
    """One line: the status and message of a tritonclient error, else the exception's text."""
    status = getattr(exc, "status", None)
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    status = status() if callable(status) else None
    text = f"{status}: {message}" if status else (message or type(exc).__name__)
    return " ".join(str(text).split())


# ---- one connection, gRPC or HTTP --------------------------------------------------------------------------


class _GrpcWire:
    def __init__(self, target: TritonTarget):
        import tritonclient.grpc as client

        self._mod, self._target = client, target
        self._client = client.InferenceServerClient(
            target.url, ssl=target.tls, root_certificates=target.tls_ca, private_key=target.tls_key,
            certificate_chain=target.tls_cert)  # paths: tritonclient reads the PEM files

    def model_config(self) -> dict:
        answer = self._client.get_model_config(self._target.model, as_json=True,
                                               client_timeout=self._target.connect_timeout_s)
        return answer["config"]

    def infer(self, tiles: np.ndarray, model: ServerModel) -> np.ndarray:
        tensor = self._mod.InferInput(model.input_name, list(tiles.shape), "UINT8")
        tensor.set_data_from_numpy(tiles)
        result = self._client.infer(self._target.model, [tensor],
                                    outputs=[self._mod.InferRequestedOutput(model.output_name)],
                                    client_timeout=self._target.timeout_s)
        return result.as_numpy(model.output_name)

    def close(self) -> None:
        self._client.close()


class _HttpWire:
    def __init__(self, target: TritonTarget):
        import tritonclient.http as client

        self._mod, self._target = client, target
        options = {key: value for key, value in (("ca_certs", target.tls_ca), ("certfile", target.tls_cert),
                                                 ("keyfile", target.tls_key)) if value}
        self._client = client.InferenceServerClient(
            target.url, connection_timeout=target.connect_timeout_s, network_timeout=target.timeout_s,
            ssl=target.tls, ssl_options=options or None)

    def model_config(self) -> dict:
        return self._client.get_model_config(self._target.model)

    def infer(self, tiles: np.ndarray, model: ServerModel) -> np.ndarray:
        tensor = self._mod.InferInput(model.input_name, list(tiles.shape), "UINT8")
        tensor.set_data_from_numpy(tiles, binary_data=True)
        output = self._mod.InferRequestedOutput(model.output_name, binary_data=True)
        result = self._client.infer(self._target.model, [tensor], outputs=[output])
        return result.as_numpy(model.output_name)

    def close(self) -> None:
        self._client.close()


_WIRES = {"grpc": _GrpcWire, "http": _HttpWire}


# ---- the engine --------------------------------------------------------------------------------------------


class TritonEngine(BundleGeometry):
    backend = "triton"

    def __init__(self, meta: BundleMeta, target: TritonTarget, streams: int = 2, max_batch: int = 16,
                 precision: str | None = None):
        self.meta, self.target, self.streams, self.max_batch = meta, target, streams, max_batch
        self.device = f"{target.protocol}://{target.url}"
        self._asked_precision = precision
        self.precision = precision or "unknown"
        self._wires: list = [None] * streams
        self._model: ServerModel | None = None
        self._slots = SlotPool(streams, "triton")
        self._closed = False

    # -- connection, one per slot, used only by that slot's thread --
    def _wire(self, slot: int):
        if self._wires[slot] is None:
            wire = _WIRES[self.target.protocol](self.target)
            try:
                model = check_model_config(wire.model_config(), self.meta, self.max_batch,
                                           self._asked_precision)
            except BaseException:
                wire.close()
                raise
            if model.model_id is None and self._model is None:
                log.warning("%s: config.pbtxt has no %s parameter; the bundle cannot be checked against it",
                            self.target.where, MODEL_ID_KEY)
            self._model = model
            self.precision = model.precision or self.precision
            self._wires[slot] = wire
        return self._wires[slot]

    def _drop(self, slot: int) -> None:
        wire, self._wires[slot] = self._wires[slot], None
        if wire is not None:
            try:
                wire.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def _call(self, slot: int, tiles: np.ndarray) -> np.ndarray:
        try:
            wire = self._wire(slot)
            maps = wire.infer(tiles, self._model)
        except ModelMismatch as exc:
            self._drop(slot)
            raise ModelMismatch(f"{self.target.where}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any client or server failure fails this batch
            self._drop(slot)
            raise EngineError(f"{self.target.where}: {_reason(exc)}") from exc
        expected = (len(tiles), 1, *self.map_shape)
        if maps is None or tuple(maps.shape) != expected:
            got = None if maps is None else tuple(maps.shape)
            raise EngineError(f"{self.target.where}: returned maps of shape {got}, expected {expected}")
        return np.require(maps, np.float32, ["C", "W", "O"])  # a new, writable array the caller owns

    def _check(self, tiles) -> None:
        if self._closed:
            raise EngineError("engine is closed")
        if not isinstance(tiles, np.ndarray):
            raise EngineInputError(f"the triton backend takes NumPy tiles, got {type(tiles).__name__}")
        check_tiles(tiles, self.input_shape, self.max_batch)

    # -- the Engine contract --
    def submit(self, tiles, slot: int = 0) -> Future:
        self._check(tiles)
        return self._slots.submit(slot, self._call, slot, np.array(tiles, copy=True))

    def infer(self, tiles):
        return self.submit(tiles, 0).result()

    def connect(self) -> None:
        """First contact on slot 0: raises ModelMismatch; a server that cannot be reached is only logged."""
        try:
            self._slots.submit(0, self._wire, 0).result()
        except ModelMismatch as exc:
            raise ModelMismatch(f"{self.target.where}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the pool may be down now and up later
            log.warning("%s does not serve now (%s); batches fail with error records until it does",
                        self.target.where, _reason(exc))

    def warmup(self) -> None:
        """One batch per bucket when the server answers; skipped (logged) while it does not."""
        for size in batch_buckets(self.max_batch):
            try:
                self.infer(np.zeros((size, *self.input_shape), dtype=np.uint8))
            except ModelMismatch:
                raise
            except EngineError as exc:
                log.warning("warm-up skipped: %s", exc)
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in range(self.streams):
            self._slots.submit(slot, self._drop, slot)
        self._slots.shutdown()


def _target(options: dict) -> TritonTarget:
    known = set(TritonTarget.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendUnavailable(f"triton backend has no options {unknown} "
                                 f"(known: {', '.join(sorted(known))})")
    for key in ("url", "model"):
        if not options.get(key):
            raise BackendUnavailable(f"triton backend needs the {key!r} option (engine.triton.{key})")
    target = TritonTarget(**options)
    if target.protocol not in PROTOCOLS:
        raise BackendUnavailable(f"triton protocol must be grpc or http, got {target.protocol!r}")
    if "://" in target.url:
        raise BackendUnavailable(f"triton url is host:port without a scheme, got {target.url!r}")
    if target.timeout_s <= 0 or target.connect_timeout_s <= 0:
        raise BackendUnavailable("triton timeout_s and connect_timeout_s must be > 0")
    return target


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 **options) -> TritonEngine:
    """``options``: the TritonTarget fields (url and model required)."""
    target = _target(options)
    for name, value in (("device", device), ("threads", threads), ("cache_dir", cache_dir)):
        if value is not None:
            raise BackendUnavailable(f"triton backend: {name} does not apply (the server's model config sets "
                                     f"where and how the model runs), got {value!r}")
    if precision not in (None, "fp32", "fp16"):
        raise BackendUnavailable(f"precision must be fp32 or fp16, got {precision!r}")
    try:
        importlib.import_module(f"tritonclient.{target.protocol}")
    except ImportError as exc:
        raise BackendUnavailable(f"triton backend needs tritonclient: {exc} "
                                 "(pip install edge-inspect[triton])") from exc
    engine = TritonEngine(meta, target, streams=streams, max_batch=max_batch, precision=precision)
    try:
        engine.connect()
    except BaseException:
        engine.close()
        raise
    return engine
