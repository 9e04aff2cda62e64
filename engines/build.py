"""model.onnx -> TensorRT engine, with a persistent timing cache and an engine cache.

Pure parts (tested without TensorRT): ``optimisation_profiles`` (one profile per stream, batch 1..max_batch,
opt = max_batch: concurrent execution contexts on a dynamic-shape engine need one profile each),
``engine_cache_key`` (sha256 over ONNX sha256, GPU name, compute capability, TensorRT version, precision,
tile shape and profiles: change any -> a new engine file) and ``timing_cache_path`` (one timing cache per GPU
name, compute capability and TensorRT version: a cache is only valid for the device and version that
wrote it). ``build_engine`` needs tensorrt and a GPU; it looks the engine up before importing onnx, so an
install with tensorrt but without onnx still opens cached engines (and says what is missing to build one).

Timing cache: loaded with ``ignore_mismatch=False``; when TensorRT refuses it (another GPU or version, or a
damaged file) the build starts from an empty cache and overwrites the file afterwards, instead of failing
every later build in that folder.

Precision: TensorRT 11 has no FP16 builder flag: FP16 is an FP16 ONNX graph (engines.fp16) built
STRONGLY_TYPED; on TensorRT 10 the same strongly typed graph builds, so one path serves both. TF32 is on by
default in TensorRT for FP32 layers: ``fp32`` clears BuilderFlag.TF32 (IEEE FP32), ``tf32`` keeps it.
The builder runs with ``device`` current (torch.cuda.device): the engine is tuned on the GPU it is keyed to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .base import BackendUnavailable, EngineError
from .bundle import BundleMeta, read_bundle

__all__ = ["BuildTarget", "PRECISIONS", "optimisation_profiles", "engine_cache_key", "default_cache_dir",
           "engine_paths", "timing_cache_path", "current_target", "build_engine", "cache_status",
           "import_tensorrt"]

log = logging.getLogger(__name__)
PRECISIONS = ("fp16", "fp32", "tf32")


@dataclass(frozen=True)
class BuildTarget:
    """What an engine is bound to besides the graph: the GPU and the TensorRT version."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str


def optimisation_profiles(streams: int, max_batch: int) -> tuple[tuple[int, int, int], ...]:
    """One (min, opt, max) batch profile per stream."""
    if streams < 1 or max_batch < 1:
        raise ValueError(f"streams and max_batch must be >= 1, got {streams}, {max_batch}")
    return tuple((1, max_batch, max_batch) for _ in range(streams))


def engine_cache_key(onnx_sha256: str, target: BuildTarget, precision: str,
                     tile_shape: tuple[int, int, int], profiles: tuple[tuple[int, int, int], ...]) -> str:
    """Pure: the file name stem of the engine built from these inputs."""
    parts = {"onnx_sha256": onnx_sha256, "gpu": target.gpu_name,
             "cc": list(target.compute_capability), "trt": target.tensorrt_version, "precision": precision,
             "tile": list(tile_shape), "profiles": [list(p) for p in profiles]}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{precision}-{digest[:32]}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGE_INSPECT_CACHE", "~/.cache/edge-inspect")).expanduser() / "tensorrt"


def engine_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(engine file, its JSON sidecar holding the key's components)."""
    return cache_dir / f"{key}.engine", cache_dir / f"{key}.json"


def timing_cache_path(cache_dir: Path, target: BuildTarget) -> Path:
    """Pure: the timing cache of one GPU model + compute capability + TensorRT version."""
    parts = {"gpu": target.gpu_name, "cc": list(target.compute_capability), "trt": target.tensorrt_version}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"timing-{digest[:16]}.cache"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt backend: the tensorrt package cannot be imported ({exc}); "
                                 "install edge-inspect[trt] on a machine with an NVIDIA GPU") from exc
    return tensorrt


def current_target(device: str = "cuda:0") -> BuildTarget:
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt backend: torch sees no CUDA device")
    props = torch.cuda.get_device_properties(torch.device(device))
    return BuildTarget(props.name, (props.major, props.minor), trt.__version__)


def _parse(trt, builder, logger, onnx_path: Path):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # ignored (always on) in TRT 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def _load_timing_cache(config, timing_path: Path):
    """Attach the timing cache at ``timing_path`` to ``config``; an empty one if TensorRT refuses the file."""
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a mismatch like any other
        log.warning("timing cache %s unreadable (%s)", timing_path, exc)
        accepted = False
    if accepted:
        return cache
    log.warning("timing cache %s does not match this GPU / TensorRT version: building from an empty one "
                "(the file is replaced after the build)", timing_path)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT refused an empty timing cache")
    return cache


def _save_timing_cache(config, timing_path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s not updated", timing_path)
        return
    _atomic_write(timing_path, bytes(cache.serialize()))


def _serialize(trt, onnx_path: Path, input_name: str, tile_shape, profiles, timing_path: Path,
               precision: str = "fp16") -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    if precision != "tf32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: FP32 layers would run TF32
    _load_timing_cache(config, timing_path)
    for low, opt, high in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, (low, *tile_shape), (opt, *tile_shape), (high, *tile_shape))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    _save_timing_cache(config, timing_path)
    return bytes(serialized)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_for(meta: BundleMeta, target: BuildTarget, precision: str, streams: int, max_batch: int):
    tile = (meta.input.height, meta.input.width, meta.input.channels)
    profiles = optimisation_profiles(streams, max_batch)
    return engine_cache_key(meta.files["onnx"]["sha256"], target, precision, tile, profiles), tile, profiles


def _device_context(device: str):
    """``device`` current for TensorRT (it builds and tunes on the current CUDA device)."""
    import torch

    return torch.cuda.device(torch.device(device))


def _import_fp16():
    try:
        from . import fp16
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt backend: building an engine needs onnx and onnxconverter-common "
                                 f"({exc}); install edge-inspect[onnx] or copy a cached engine here") from exc
    return fp16


def build_engine(bundle_dir: str | Path, precision: str = "fp16", streams: int = 2, max_batch: int = 16,
                 cache_dir: str | Path | None = None, device: str = "cuda:0", rebuild: bool = False) -> Path:
    """Build (or find in the cache) the engine for this bundle on this GPU; return its path."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    bundle_dir = Path(bundle_dir)
    meta = read_bundle(bundle_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = current_target(device)
    key, tile, profiles = _key_for(meta, target, precision, streams, max_batch)
    engine_file, sidecar = engine_paths(cache_dir, key)
    if engine_file.is_file() and not rebuild:
        log.info("TensorRT engine cache hit: %s", engine_file)
        return engine_file
    fp16 = _import_fp16()
    from .graph import ONNX_INPUT

    log.info("building TensorRT %s engine for %s on %s (minutes on first build)", precision, meta.model_id,
             target.gpu_name)
    graph_precision = "fp16" if precision == "fp16" else "fp32"
    prepared = fp16.prepare_onnx(bundle_dir / meta.files["onnx"]["path"], graph_precision,
                                 cache_dir / f"{key}.onnx")
    with _device_context(device):
        data = _serialize(trt, prepared, ONNX_INPUT, tile, profiles, timing_cache_path(cache_dir, target),
                          precision)
    _atomic_write(engine_file, data)
    sidecar.write_text(json.dumps({"model_id": meta.model_id, "precision": precision, "tile": list(tile),
                                   "profiles": [list(p) for p in profiles], "target": asdict(target),
                                   "onnx_sha256": meta.files["onnx"]["sha256"]}, indent=2) + "\n")
    prepared.unlink(missing_ok=True)
    return engine_file


def cache_status(bundle_dir: str | Path, precision: str = "fp16", streams: int = 2, max_batch: int = 16,
                 cache_dir: str | Path | None = None, target: BuildTarget | None = None) -> dict:
    """Verify the bundle; say whether the engine for it (on ``target``, default this GPU) is cached."""
    meta = read_bundle(bundle_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    status = {"bundle": str(bundle_dir), "model_id": meta.model_id, "bundle_ok": True,
              "cache_dir": str(cache_dir)}
    if target is None:
        try:
            target = current_target()
        except BackendUnavailable as exc:
            return {**status, "engine": None, "engine_cached": False, "reason": str(exc)}
    key, _tile, _profiles = _key_for(meta, target, precision, streams, max_batch)
    engine_file, _sidecar = engine_paths(cache_dir, key)
    return {**status, "engine": str(engine_file), "engine_cached": engine_file.is_file(),
            "target": asdict(target)}
