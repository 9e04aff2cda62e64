"""A bundle -> a Triton Inference Server model repository (`edge-engines triton-repo`).

    REPO/<name>/config.pbtxt  names, dims, max_batch_size, dynamic batching, instance groups, and the
                              bundle's model id and precision as parameters (the triton engine checks them)
    REPO/<name>/1/...         the model files, by format:
      onnx      model.onnx (FP32, or the FP16 graph of engines.fp16) for Triton's onnxruntime backend
      tensorrt  model.plan built by engines.build on the GPU it will run on (one optimisation profile per
                instance), for Triton's tensorrt backend
      python    model.py + bundle/ + a copy of this engines package: Triton's Python backend running the
                bundle through our ONNX Runtime engine (engines.triton_python); what the CPU tritonserver
                bundled in nvidia-pytriton can load (it has no onnxruntime backend)

Tensors are the bundle graph's own: uint8 tiles B x H x W x C in, float32 maps B x 1 x h x w out.
``config_pbtxt`` is a pure function of a ``RepoSpec``; the writers only add files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .base import EngineError, batch_buckets
from .bundle import META_FILE, BundleMeta, read_bundle

__all__ = ["FORMATS", "KINDS", "RepoSpec", "config_pbtxt", "spec_for", "write_repository",
           "MODEL_ID_KEY", "PRECISION_KEY", "THREADS_KEY"]

FORMATS = ("onnx", "tensorrt", "python")
KINDS = ("cpu", "gpu")
MODEL_ID_KEY = "edge_inspect_model_id"
PRECISION_KEY = "edge_inspect_precision"
THREADS_KEY = "edge_inspect_threads"
_BACKEND = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "python": "python"}
_PYTHON_MODEL = ('"""Triton Python backend entry point: ./bundle through engines.onnxruntime_."""\n'
                 "from engines.triton_python import TritonPythonModel  # noqa: F401\n")


@dataclass(frozen=True)
class RepoSpec:
    """Everything config.pbtxt states."""

    name: str
    format: str  # onnx | tensorrt | python
    max_batch: int
    precision: str  # fp32 | fp16
    instances: int
    kind: str  # cpu | gpu
    queue_delay_us: int
    input_name: str
    input_dims: tuple[int, int, int]  # H, W, C (uint8)
    output_name: str
    output_dims: tuple[int, int, int]  # 1, h, w (float32)
    model_id: str
    threads: int = 0  # python format: ONNX Runtime threads per instance; 0 = cores / instances


def _check_spec(spec: RepoSpec) -> None:
    """EngineError (one line) for a spec Triton would refuse or this format cannot run."""
    if spec.format not in FORMATS:
        raise EngineError(f"format must be one of {', '.join(FORMATS)}, got {spec.format!r}")
    if spec.kind not in KINDS:
        raise EngineError(f"kind must be cpu or gpu, got {spec.kind!r}")
    if spec.precision not in ("fp32", "fp16"):
        raise EngineError(f"precision must be fp32 or fp16, got {spec.precision!r}")
    if spec.max_batch < 1 or spec.instances < 1 or spec.queue_delay_us < 0 or spec.threads < 0:
        raise EngineError("max_batch and instances must be >= 1, queue_delay_us and threads >= 0")
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        raise EngineError(f"model name must be a plain directory name, got {spec.name!r}")
    if spec.format == "python" and (spec.kind, spec.precision) != ("cpu", "fp32"):
        raise EngineError("the python format runs ONNX Runtime on the CPU: kind cpu, precision fp32 only")
    if spec.format == "tensorrt" and spec.kind != "gpu":
        raise EngineError("the tensorrt format runs on a GPU: kind gpu only")


def _dims(values) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value {{ string_value: "{value}" }}\n}}\n'


def _instance_groups(spec: RepoSpec) -> str:
    kind = "KIND_GPU" if spec.kind == "gpu" else "KIND_CPU"
    if spec.format == "tensorrt":  # one instance per optimisation profile of the plan
        groups = [f'  {{\n    count: 1\n    kind: {kind}\n    profile: [ "{i}" ]\n  }}'
                  for i in range(spec.instances)]
    else:
        groups = [f"  {{\n    count: {spec.instances}\n    kind: {kind}\n  }}"]
    return "instance_group [\n" + ",\n".join(groups) + "\n]\n"


def config_pbtxt(spec: RepoSpec) -> str:
    """The config.pbtxt text (protobuf text format) of ``spec``."""
    _check_spec(spec)
    preferred = [size for size in batch_buckets(spec.max_batch) if size > 1] or [1]
    text = (
        f'name: "{spec.name}"\n'
        f'backend: "{_BACKEND[spec.format]}"\n'
        f"max_batch_size: {spec.max_batch}\n"
        f'input [\n  {{\n    name: "{spec.input_name}"\n    data_type: TYPE_UINT8\n'
        f"    dims: {_dims(spec.input_dims)}\n  }}\n]\n"
        f'output [\n  {{\n    name: "{spec.output_name}"\n    data_type: TYPE_FP32\n'
        f"    dims: {_dims(spec.output_dims)}\n  }}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred)}\n"
        f"  max_queue_delay_microseconds: {spec.queue_delay_us}\n}}\n"
        + _instance_groups(spec)
        + _parameter(MODEL_ID_KEY, spec.model_id)
        + _parameter(PRECISION_KEY, spec.precision)
    )
    if spec.format == "python":
        text += _parameter(THREADS_KEY, str(spec.threads))
    return text


def _io_names(onnx_path: Path) -> tuple[str, str]:
    """(input, output) tensor names of the bundle graph, read with onnx (the ``onnx`` extra)."""
    try:
        import onnx
    except ImportError as exc:
        raise EngineError(f"triton-repo reads the graph with the onnx package: {exc} "
                          "(pip install edge-inspect[onnx])") from exc
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return graph.input[0].name, graph.output[0].name


def spec_for(bundle_dir: Path, meta: BundleMeta, name: str, fmt: str, max_batch: int, precision: str,
             instances: int, kind: str, queue_delay_us: int, threads: int = 0) -> RepoSpec:
    """The RepoSpec of a bundle (tensor names from its graph, dims from bundle.json)."""
    input_name, output_name = _io_names(bundle_dir / meta.files["onnx"]["path"])
    return RepoSpec(name=name, format=fmt, max_batch=max_batch, precision=precision, instances=instances,
                    kind=kind, queue_delay_us=queue_delay_us, input_name=input_name,
                    input_dims=(meta.input.height, meta.input.width, meta.input.channels),
                    output_name=output_name, output_dims=(1, meta.map.height, meta.map.width),
                    model_id=meta.model_id, threads=threads)


# ---- model files, by format --------------------------------------------------------------------------------


def _write_onnx(bundle_dir: Path, meta: BundleMeta, spec: RepoSpec, version_dir: Path) -> None:
    source = bundle_dir / meta.files["onnx"]["path"]
    if spec.precision == "fp32":
        shutil.copyfile(source, version_dir / "model.onnx")
        return
    import onnx

    from .fp16 import convert_to_fp16

    onnx.save(convert_to_fp16(onnx.load(str(source))), str(version_dir / "model.onnx"))


def _write_tensorrt(bundle_dir: Path, meta: BundleMeta, spec: RepoSpec, version_dir: Path,
                    cache_dir: Path | None) -> None:
    from .build import build_engine

    plan = build_engine(bundle_dir, precision=spec.precision, streams=spec.instances,
                        max_batch=spec.max_batch, cache_dir=cache_dir)
    shutil.copyfile(plan, version_dir / "model.plan")


def _write_python(bundle_dir: Path, meta: BundleMeta, version_dir: Path) -> None:
    (version_dir / "model.py").write_text(_PYTHON_MODEL)
    bundle_copy = version_dir / "bundle"
    bundle_copy.mkdir()
    for entry in meta.files.values():
        shutil.copyfile(bundle_dir / entry["path"], bundle_copy / entry["path"])
    shutil.copyfile(bundle_dir / META_FILE, bundle_copy / META_FILE)
    package = Path(__file__).resolve().parent
    target = version_dir / package.name
    target.mkdir()
    for source in sorted(package.glob("*.py")):
        shutil.copyfile(source, target / source.name)


def write_repository(bundle_dir: str | Path, out: str | Path, name: str | None = None, fmt: str = "onnx",
                     max_batch: int = 16, precision: str = "fp32", instances: int = 1,
                     kind: str | None = None, queue_delay_us: int = 500, threads: int = 0,
                     cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Write REPO/<name>/ for the bundle; returns the model directory. kind None: cpu for python, else gpu."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    meta = read_bundle(bundle_dir)
    name = name or f"{meta.kind}-{meta.size}"
    kind = kind or ("cpu" if fmt == "python" else "gpu")
    spec = spec_for(bundle_dir, meta, name, fmt, max_batch, precision, instances, kind, queue_delay_us,
                    threads)
    text = config_pbtxt(spec)  # validates the spec before anything is written
    model_dir = out / name
    if model_dir.exists():
        if not force:
            raise EngineError(f"{model_dir} exists; pass --force to replace it")
        shutil.rmtree(model_dir)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    try:
        if fmt == "onnx":
            _write_onnx(bundle_dir, meta, spec, version_dir)
        elif fmt == "tensorrt":
            _write_tensorrt(bundle_dir, meta, spec, version_dir, Path(cache_dir) if cache_dir else None)
        else:
            _write_python(bundle_dir, meta, version_dir)
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir
