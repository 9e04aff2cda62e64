"""Engines: a model bundle turned into something that runs (ONNX Runtime, OpenVINO, PyTorch, TensorRT).

``open_engine(bundle_dir, backend="auto" | "onnxruntime" | "openvino" | "torch" | "tensorrt", ...)`` returns
an object that follows the Engine protocol (engines.base). Importing this package imports neither torch nor
onnxruntime nor openvino.
"""

from .base import BackendUnavailable, Engine, EngineError, EngineInputError, InferHandle
from .bundle import BundleError, BundleMeta, read_bundle
from .registry import BACKENDS, available_backends, choose_backend, open_engine

__all__ = ["open_engine", "BACKENDS", "available_backends", "choose_backend", "Engine", "InferHandle",
           "EngineError", "EngineInputError", "BackendUnavailable", "BundleError", "BundleMeta",
           "read_bundle"]
