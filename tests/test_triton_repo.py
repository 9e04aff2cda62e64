"""triton-repo without a server: config.pbtxt text, the files of each format, the CLI, and the checks the
triton engine makes of a served model's config (tests/test_triton.py loads repositories in a real server)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from engines import BackendUnavailable, EngineError, open_engine
from engines.bundle import read_bundle
from engines.cli import main
from engines.triton_ import ModelMismatch, check_model_config
from engines.triton_repo import MODEL_ID_KEY, PRECISION_KEY, RepoSpec, config_pbtxt, write_repository

SPEC = RepoSpec(name="tiny", format="python", max_batch=8, precision="fp32", instances=2, kind="cpu",
                queue_delay_us=300, input_name="tiles", input_dims=(32, 32, 1), output_name="anomaly_map",
                output_dims=(1, 8, 8), model_id="tiny-xs-0123456789ab", threads=1)


def test_config_states_names_dims_batching_instances_and_the_bundle():
    text = config_pbtxt(SPEC)
    for line in ('name: "tiny"', 'backend: "python"', "max_batch_size: 8", 'name: "tiles"',
                 "data_type: TYPE_UINT8", "dims: [ 32, 32, 1 ]", 'name: "anomaly_map"',
                 "data_type: TYPE_FP32", "dims: [ 1, 8, 8 ]", "preferred_batch_size: [ 2, 4, 8 ]",
                 "max_queue_delay_microseconds: 300", "count: 2", "kind: KIND_CPU", f'key: "{MODEL_ID_KEY}"',
                 'string_value: "tiny-xs-0123456789ab"', f'key: "{PRECISION_KEY}"', 'string_value: "fp32"',
                 'key: "edge_inspect_threads"'):
        assert line in text, line
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")


def test_config_per_format():
    onnx = config_pbtxt(replace(SPEC, format="onnx", kind="gpu", precision="fp16"))
    assert 'backend: "onnxruntime"' in onnx and "KIND_GPU" in onnx and "edge_inspect_threads" not in onnx
    trt = config_pbtxt(replace(SPEC, format="tensorrt", kind="gpu", precision="fp16", instances=3))
    assert 'backend: "tensorrt"' in trt
    assert [f'profile: [ "{i}" ]' in trt for i in range(3)] == [True] * 3 and trt.count("count: 1") == 3
    assert "preferred_batch_size: [ 1 ]" in config_pbtxt(replace(SPEC, max_batch=1))


@pytest.mark.parametrize("change, message", [
    (dict(format="python", precision="fp16"), "kind cpu, precision fp32 only"),
    (dict(format="python", kind="gpu"), "kind cpu, precision fp32 only"),
    (dict(format="tensorrt", kind="cpu"), "kind gpu only"),
    (dict(format="savedmodel"), "format must be one of"),
    (dict(max_batch=0), "must be >= 1"),
    (dict(name="../x"), "plain directory name"),
])
def test_config_refuses_what_cannot_run(change, message):
    with pytest.raises(EngineError, match=message):
        config_pbtxt(replace(SPEC, **change))


def test_python_repository_is_self_contained(tiny_bundle, tmp_path):
    model_dir = write_repository(tiny_bundle, tmp_path / "repo", name="tiny", fmt="python", max_batch=8)
    version = model_dir / "1"
    assert (version / "model.py").read_text().strip().endswith("import TritonPythonModel  # noqa: F401")
    assert read_bundle(version / "bundle").model_id == read_bundle(tiny_bundle).model_id  # sha256 verified
    assert {"__init__.py", "onnxruntime_.py", "triton_python.py", "registry.py"} <= {
        p.name for p in (version / "engines").glob("*.py")}
    text = (model_dir / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in text and read_bundle(tiny_bundle).model_id in text
    with pytest.raises(EngineError, match="exists; pass --force"):
        write_repository(tiny_bundle, tmp_path / "repo", name="tiny", fmt="python")
    write_repository(tiny_bundle, tmp_path / "repo", name="tiny", fmt="python", max_batch=4, force=True)
    assert "max_batch_size: 4" in (model_dir / "config.pbtxt").read_text()


def test_onnx_repository_fp32_is_the_bundle_graph_and_fp16_keeps_its_io(tiny_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxconverter_common")
    fp32 = write_repository(tiny_bundle, tmp_path / "r", name="m32", fmt="onnx")
    assert (fp32 / "1" / "model.onnx").read_bytes() == (tiny_bundle / "model.onnx").read_bytes()
    fp16 = write_repository(tiny_bundle, tmp_path / "r", name="m16", fmt="onnx", precision="fp16")
    graph = onnx.load(str(fp16 / "1" / "model.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types == {"tiles": onnx.TensorProto.UINT8, "anomaly_map": onnx.TensorProto.FLOAT}
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    assert 'string_value: "fp16"' in (fp16 / "config.pbtxt").read_text()
    # what Triton's onnxruntime backend would run: the config's tensors fit the graph ONNX Runtime loads
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(fp16 / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"tiles": np.zeros((3, 32, 32, 1), np.uint8)})[0]
    assert out.shape == (3, 1, 8, 8) and out.dtype == np.float32


def test_tensorrt_repository_needs_tensorrt_here(tiny_bundle, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: the plan would really be built (GPU test)")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        write_repository(tiny_bundle, tmp_path / "r", name="trt", fmt="tensorrt")
    assert not (tmp_path / "r" / "trt").exists()  # nothing half-written


def test_cli_triton_repo(tiny_bundle, tmp_path, capsys):
    assert main(["triton-repo", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "repo"), "--format",
                 "python", "--max-batch", "4", "--instances", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"repository": str(tmp_path / "repo"), "model": "tiny-xs", "format": "python",
                       "precision": "fp32"}
    assert "count: 2" in (tmp_path / "repo" / "tiny-xs" / "config.pbtxt").read_text()
    assert main(["triton-repo", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "repo"), "--format",
                 "python", "--precision", "fp16"]) == 1
    assert "precision fp32 only" in capsys.readouterr().err
    assert main(["triton-repo", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- the engine's check of a served config (JSON as tritonclient returns it: gRPC gives dims as strings) -


def _served(meta, **change) -> dict:
    config = {"name": "tiny", "max_batch_size": 8,
              "input": [{"name": "tiles", "data_type": "TYPE_UINT8", "dims": ["32", "32", "1"]}],
              "output": [{"name": "anomaly_map", "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}],
              "parameters": {MODEL_ID_KEY: {"string_value": meta.model_id},
                             PRECISION_KEY: {"string_value": "fp32"}}}
    config.update(change)
    return config


def test_check_model_config_accepts_the_generated_model(tiny_bundle):
    meta = read_bundle(tiny_bundle)
    model = check_model_config(_served(meta), meta, max_batch=8, precision=None)
    assert (model.input_name, model.output_name, model.max_batch, model.precision) == (
        "tiles", "anomaly_map", 8, "fp32")
    unmarked = check_model_config(_served(meta, parameters={}), meta, max_batch=4, precision="fp32")
    assert unmarked.model_id is None  # a hand-written config: geometry checked, the bundle cannot be


@pytest.mark.parametrize("change, kwargs, message", [
    (dict(max_batch_size=4), {}, "max_batch_size is 4"),
    (dict(input=[{"name": "x", "data_type": "TYPE_FP32", "dims": [32, 32, 1]}]), {}, "needs TYPE_UINT8"),
    (dict(output=[{"name": "m", "data_type": "TYPE_FP32", "dims": [1, 16, 16]}]), {},
     r"needs TYPE_FP32 \[1, 8, 8\]"),
    (dict(output=[]), {}, "has 0 outputs"),
    (dict(parameters={MODEL_ID_KEY: {"string_value": "tiny-xs-ffffffffffff"}}), {}, "deploy the same bundle"),
    ({}, dict(precision="fp16"), "runs fp32, fp16 was asked for"),
])
def test_check_model_config_names_the_mismatch(tiny_bundle, change, kwargs, message):
    meta = read_bundle(tiny_bundle)
    with pytest.raises(ModelMismatch, match=message):
        check_model_config(_served(meta, **change), meta, **{"max_batch": 8, "precision": None, **kwargs})


@pytest.mark.parametrize("options, message", [
    ({}, "needs the 'url' option"),
    (dict(url="127.0.0.1:1"), "needs the 'model' option"),
    (dict(url="grpc://h:1", model="m"), "without a scheme"),
    (dict(url="h:1", model="m", protocol="ws"), "grpc or http"),
    (dict(url="h:1", model="m", timeout_s=0), "must be > 0"),
    (dict(url="h:1", model="m", retries=3), "no options"),
    (dict(url="h:1", model="m", threads=2), "threads does not apply"),
])
def test_open_refuses_bad_options(tiny_bundle, options, message):
    threads = options.pop("threads", None)
    with pytest.raises(BackendUnavailable, match=message):
        open_engine(tiny_bundle, backend="triton", threads=threads, **options)
