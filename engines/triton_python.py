"""Runs inside Triton's Python backend: a bundle served through our ONNX Runtime engine.

`triton-repo --format python` writes a model.py that imports ``TritonPythonModel`` from here, with a copy of
this package and of the bundle beside it (REPO/<name>/1/{model.py, engines/, bundle/}). Each model instance
(a stub process of the server) opens ``engines.onnxruntime_`` on the bundle with max_batch = the config's
max_batch_size and ONNX Runtime threads = the edge_inspect_threads parameter (0: cores / instances).

``execute`` gets the requests Triton's dynamic batcher gathered: their tiles are checked one request at a time
(a bad request gets its own error response, the others are served), concatenated, run in one ONNX Runtime call
per max_batch tiles, and split back. Only the server imports this module (``triton_python_backend_utils``
exists only inside the stub); it needs numpy and onnxruntime in the server's Python environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import EngineInputError, check_tiles
from .registry import open_engine
from .triton_repo import THREADS_KEY

__all__ = ["TritonPythonModel", "instance_threads"]


def instance_threads(config: dict) -> int:
    """ONNX Runtime threads of one instance: the edge_inspect_threads parameter, or cores / instances."""
    value = int(config.get("parameters", {}).get(THREADS_KEY, {}).get("string_value", "0") or 0)
    if value > 0:
        return value
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
    return max(1, (os.cpu_count() or 1) // instances)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        self._input = config["input"][0]["name"]
        self._output = config["output"][0]["name"]
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self._engine = open_engine(bundle, backend="onnxruntime", streams=1,
                                   max_batch=int(config["max_batch_size"]), threads=instance_threads(config))

    def _tiles(self, request):
        tensor = self._pb.get_input_tensor_by_name(request, self._input)
        if tensor is None:
            raise EngineInputError(f"request has no input named {self._input!r}")
        tiles = tensor.as_numpy()
        check_tiles(tiles, self._engine.input_shape, self._engine.max_batch)
        return tiles

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        step = self._engine.max_batch
        parts = [self._engine.infer(tiles[i:i + step]) for i in range(0, len(tiles), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def execute(self, requests):
        pb = self._pb
        responses: list = [None] * len(requests)
        good, batches = [], []
        for index, request in enumerate(requests):
            try:
                batches.append(self._tiles(request))
                good.append(index)
            except EngineInputError as exc:
                responses[index] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
        if good:
            try:
                maps = self._infer(np.concatenate(batches) if len(batches) > 1 else batches[0])
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
                for index in good:
                    responses[index] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
                        f"{type(exc).__name__}: {exc}"))
                return responses
            offset = 0
            for index, tiles in zip(good, batches, strict=True):
                part = maps[offset:offset + len(tiles)]
                offset += len(tiles)
                responses[index] = pb.InferenceResponse(output_tensors=[pb.Tensor(self._output, part)])
        return responses

    def finalize(self) -> None:
        self._engine.close()
