"""Fakes for the CUDA and TensorRT calls our backends make, so their bookkeeping runs on a CPU-only machine.

``FakeCudaOps`` stands in for engines.cuda_slots.CudaOps: tensors live on the CPU, streams and events are
recording objects, and every call is appended to ``ops.log`` in order. It tests *our* logic (which stream
waits for which, what is record_stream-ed, what stays referenced, what is freed before empty_cache), not
CUDA's; the GPU tests in test_engines_cuda.py / test_engines_tensorrt.py check the real thing.

``FakeTensorRT`` is a module-like namespace with the TensorRT 10/11 Python names engines.build and
engines.tensorrt_ use. Its builder keeps the ONNX graph it parsed (our prepared graph: cast-first, FP16 when
asked) in the "engine" bytes; its execution contexts run that graph with ONNX Runtime, reading the input
from and writing the output to the raw addresses given by set_tensor_address, so a context bound to the
wrong buffers, or two contexts on one optimisation profile, give wrong values or an error.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json

import numpy as np
import torch


class FakeStream:
    _count = 0

    def __init__(self, ops, name: str):
        FakeStream._count += 1
        self.ops, self.name, self.cuda_stream = ops, name, FakeStream._count
        self.device = ops.current_device

    def wait_stream(self, other) -> None:
        self.ops.log.append(("wait_stream", self.name, other.name))

    def synchronize(self) -> None:
        self.ops.log.append(("stream_synchronize", self.name))

    def __repr__(self):
        return f"FakeStream({self.name})"


class FakeEvent:
    def __init__(self, ops):
        self.ops = ops

    def record(self, stream) -> None:
        self.ops.log.append(("event_record", stream.name))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.ops.log.append(("event_synchronize",))


class FakeCudaOps:
    """Same methods as engines.cuda_slots.CudaOps; CPU tensors, recording streams/events."""

    def __init__(self):
        self.log: list[tuple] = []
        self.current_device = "cuda:0"
        self.active = None
        self._defaults: dict[str, FakeStream] = {}
        self._slots = 0
        self.on_empty_cache = None  # callback(ops) run when empty_cache is called

    def tensor_device(self, device):
        return torch.device("cpu")

    @contextlib.contextmanager
    def use_device(self, device):
        previous, self.current_device = self.current_device, str(device)
        self.log.append(("use_device", str(device)))
        try:
            yield
        finally:
            self.current_device = previous

    def stream(self, device):
        self._slots += 1
        stream = FakeStream(self, f"slot{self._slots}@{device}")
        self.log.append(("stream", stream.name, self.current_device))
        return stream

    def current_stream(self, device):
        key = str(device)
        if key not in self._defaults:
            self._defaults[key] = FakeStream(self, f"current@{key}")
        return self.active or self._defaults[key]

    @contextlib.contextmanager
    def on(self, stream):
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def event(self):
        return FakeEvent(self)

    def pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def record_stream(self, tensor, stream) -> None:
        self.log.append(("record_stream", tensor.data_ptr(), stream.name))

    def synchronize(self, device) -> None:
        self.log.append(("synchronize", str(device)))

    def empty_cache(self) -> None:
        self.log.append(("empty_cache",))
        if self.on_empty_cache is not None:
            self.on_empty_cache(self)

    def calls(self, name: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == name]


# --- TensorRT ----------------------------------------------------------------------------------------------

class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class _Config:
    def __init__(self, trt):
        self.trt, self.flags, self.profiles, self._cache = trt, {"TF32"}, [], None

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, blob: bytes):
        return _TimingCache(bytes(blob), self.trt)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        ok = cache.blob in (b"", self.trt.timing_blob()) or ignore_mismatch
        self._cache = cache if ok else None  # as TensorRT: a refused cache leaves the config without one
        self.trt.timing_loads.append(cache.blob if ok else b"<refused>")
        return ok

    def get_timing_cache(self):
        return self._cache

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile.shapes)


class _TimingCache:
    def __init__(self, blob: bytes, trt):
        self.blob, self.trt = blob, trt

    def serialize(self):
        return bytearray(self.trt.timing_blob())  # after a build: valid for this GPU and version


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _Network:
    onnx = b""


class _Parser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path) -> bool:
        with open(path, "rb") as fh:
            self.network.onnx = fh.read()
        return True


class _Builder:
    def __init__(self, trt, logger):
        self.trt = trt
        self.device = trt.current_device  # the CUDA device current when the builder was made

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config(self.trt)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        self.trt.builds.append({"device": self.device, "tf32": "TF32" in config.flags})
        return json.dumps({"onnx": base64.b64encode(network.onnx).decode(), "profiles": config.profiles,
                           "device": self.device, "tf32": "TF32" in config.flags}).encode()


class _Engine:
    def __init__(self, spec: dict):
        import onnxruntime as ort

        self.spec = spec
        self.session = ort.InferenceSession(base64.b64decode(spec["onnx"]),
                                            providers=["CPUExecutionProvider"])
        self.num_optimization_profiles = len(spec["profiles"])
        self.num_io_tensors = 2
        self._names = [self.session.get_inputs()[0].name, self.session.get_outputs()[0].name]
        self.profiles_in_use: set[int] = set()

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str):
        return "INPUT" if name == self._names[0] else "OUTPUT"

    def get_tensor_dtype(self, name: str):
        return "UINT8" if name == self._names[0] else "FLOAT"

    def create_execution_context(self):
        return _Context(self)


def _array_at(address: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    buffer = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.profile, self.stream, self.addresses, self.shape = engine, None, None, {}, None

    def set_optimization_profile_async(self, index: int, stream_handle) -> bool:
        if index in self.engine.profiles_in_use:
            raise RuntimeError(f"optimisation profile {index} is already used by another context")
        self.engine.profiles_in_use.add(index)
        self.profile, self.stream = index, stream_handle
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        low, _opt, high = self.engine.spec["profiles"][self.profile][name]
        if not low[0] <= shape[0] <= high[0]:
            return False
        self.shape = tuple(shape)
        return True

    def execute_async_v3(self, stream_handle) -> bool:
        name_in, name_out = self.engine._names
        tiles = _array_at(self.addresses[name_in], self.shape, np.uint8).copy()
        maps = self.engine.session.run(None, {name_in: tiles})[0]
        _array_at(self.addresses[name_out], maps.shape, np.float32)[...] = maps
        return True


class FakeTensorRT:
    """Module-like stand-in for ``tensorrt`` (the names engines.build and engines.tensorrt_ use)."""

    __version__ = "10.99.0-fake"

    def __init__(self, gpu: str = "FakeGPU"):
        self.gpu, self.current_device = gpu, "cuda:0"
        self.builds: list[dict] = []
        self.timing_loads: list[bytes] = []
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=2: None})
        self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=0)
        self.BuilderFlag = _Enum(TF32="TF32")
        self.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
        self.DataType = _Enum(UINT8="UINT8", FLOAT="FLOAT")
        trt = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data: bytes):
                try:
                    return _Engine(json.loads(bytes(data)))
                except ValueError:
                    return None

        self.Runtime = Runtime
        self.Builder = lambda logger: _Builder(trt, logger)
        self.OnnxParser = _Parser

    def timing_blob(self) -> bytes:
        return f"FAKE-TIMING {self.gpu} {self.__version__}".encode()

    @contextlib.contextmanager
    def device_context(self, device):
        previous, self.current_device = self.current_device, str(device)
        try:
            yield
        finally:
            self.current_device = previous
