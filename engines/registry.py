"""Pick and open an engine: ``open_engine(bundle_dir, backend=...)``.

Backends are a dict name -> opener (no boolean flags); ``triton`` sends batches to a Triton server and is
never picked by ``auto``. ``auto`` picks TensorRT on an NVIDIA GPU with tensorrt importable, else PyTorch
CUDA, else OpenVINO on the CPU when it is installed, else ONNX Runtime CPU, and logs one INFO line saying what
and why. Asking for a backend, device or precision this machine cannot give raises BackendUnavailable: never a
silent fallback. Backend modules are imported only when opened, so the CPU backends never import torch.

Precision ``auto`` is decided by the CPU backends (openvino, onnxruntime: engines.cpuinfo.choose_precision);
for torch and tensorrt it means their own default (fp16 on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from .base import BackendUnavailable, Engine
from .bundle import read_bundle

__all__ = ["BACKENDS", "open_engine", "choose_backend", "cuda_available", "tensorrt_missing_reason",
           "openvino_available", "available_backends"]

log = logging.getLogger(__name__)

# name -> module holding ``open_backend(bundle_dir, meta, *, device, precision, streams, max_batch, threads,
# cache_dir, **options)``
BACKENDS: dict[str, str] = {
    "onnxruntime": "engines.onnxruntime_",
    "openvino": "engines.openvino_",
    "torch": "engines.torch_",
    "tensorrt": "engines.tensorrt_",
    "triton": "engines.triton_",  # a remote Triton Inference Server (options: url, model, protocol, ...)
}
CPU_PRECISION_BACKENDS = ("onnxruntime", "openvino")  # backends that resolve precision "auto" themselves


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (monkeypatched in tests)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT can run here, else why not (monkeypatched in tests)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install edge-inspect[trt])"
    if not cuda_available():
        return "no CUDA device is visible to torch"
    return None


def openvino_available() -> bool:
    """True when the openvino package is installed (monkeypatched in tests)."""
    return importlib.util.find_spec("openvino") is not None


def choose_backend(cuda: bool, trt_missing: str | None, openvino: bool = False) -> tuple[str, str]:
    """Pure rule behind ``auto``: (backend, reason)."""
    if cuda and trt_missing is None:
        return "tensorrt", "NVIDIA GPU found and tensorrt importable"
    if cuda:
        return "torch", f"NVIDIA GPU found but TensorRT unusable ({trt_missing})"
    if openvino:
        return "openvino", "no CUDA device visible; openvino installed"
    return "onnxruntime", "no CUDA device visible; openvino not installed"


def available_backends() -> list[str]:
    """Backends whose Python packages import on this machine (devices not checked)."""
    packages = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch",
                "tensorrt": "tensorrt", "triton": "tritonclient"}
    return [name for name in BACKENDS if importlib.util.find_spec(packages[name]) is not None]


def open_engine(bundle_dir: str | Path, backend: str = "auto", device: str | None = None,
                precision: str | None = None, streams: int = 2, max_batch: int = 16,
                threads: int | None = None, cache_dir: str | Path | None = None, **options) -> Engine:
    """Open ``bundle_dir`` on ``backend``; backend-specific ``options`` (e.g. cuda_graphs) pass through."""
    if streams < 1 or max_batch < 1:
        raise ValueError(f"streams and max_batch must be >= 1, got streams={streams} max_batch={max_batch}")
    if backend == "auto":
        backend, why = choose_backend(cuda_available(), tensorrt_missing_reason(), openvino_available())
        if device is None and backend in ("torch", "tensorrt"):
            device = "cuda:0"  # chosen for the GPU: never let the backend drop to its CPU default
        log.info("engine backend auto -> %s (%s)", backend, why)
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; known: {', '.join(['auto', *BACKENDS])}")
    if precision == "auto" and backend not in CPU_PRECISION_BACKENDS:
        precision = None  # the GPU backends' own default
    meta = read_bundle(bundle_dir)
    module_name = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {backend!r} cannot be imported: {exc}") from exc
    return module.open_backend(Path(bundle_dir), meta, device=device, precision=precision, streams=streams,
                               max_batch=max_batch, threads=threads,
                               cache_dir=Path(cache_dir) if cache_dir is not None else None, **options)
