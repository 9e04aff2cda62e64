"""engines.quantize: calibration tiles, the QDQ INT8 graph (pre/post FP32), the bundle entry, the CLI."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import cli
from engines.bundle import BundleError, carried_precisions, onnx_file, read_bundle, write_bundle_json
from engines.graph import ONNX_INPUT
from engines.quantize import FP32_SCOPES, calibration_tiles, quantize_bundle
from trainer.data.synthetic import textured_image


def _textures(n, size=64, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return [textured_image(size, rng, channels=channels) for _ in range(n)]


# ---------------------------------------------------------------- calibration tiles (pure)

def test_calibration_tiles_are_seeded_crops_of_every_image():
    images = [np.full((40, 50, 1), i, np.uint8) for i in range(3)]
    tiles = calibration_tiles(images, (32, 32), 1, count=7, seed=3, anomaly_fraction=0)
    assert tiles.shape == (7, 32, 32, 1) and tiles.dtype == np.uint8
    assert [int(t.max()) for t in tiles] == [0, 1, 2, 0, 1, 2, 0]  # images in turn, untouched
    np.testing.assert_array_equal(tiles, calibration_tiles(images, (32, 32), 1, count=7, seed=3,
                                                           anomaly_fraction=0))
    ramp = [np.arange(64 * 64, dtype=np.uint32).reshape(64, 64, 1).astype(np.uint8)]
    crops = calibration_tiles(ramp, (16, 16), 1, count=5, seed=1, anomaly_fraction=0)
    assert len({c.tobytes() for c in crops}) > 1  # different places


def test_calibration_tiles_get_noise_squares():
    images = [np.full((64, 64, 1), 100, np.uint8)]
    tiles = calibration_tiles(images, (32, 32), 1, count=8, seed=0)  # default: a quarter
    changed = [bool((t != 100).any()) for t in tiles]
    assert changed == [True, True] + [False] * 6
    assert 2 * 2 <= int((tiles[0] != 100).sum()) <= 16 * 16  # one square, at most half the tile wide
    with pytest.raises(ValueError, match="anomaly_fraction"):
        calibration_tiles(images, (32, 32), 1, count=8, anomaly_fraction=1.5)


def test_calibration_tiles_accept_2d_images():
    assert calibration_tiles([np.zeros((32, 32), np.uint8)], (32, 32), 1, count=1).shape == (1, 32, 32, 1)


@pytest.mark.parametrize("images, count, reason", [
    ([], 4, "no calibration images"),
    ([np.zeros((16, 64, 1), np.uint8)], 4, "smaller than the tile"),
    ([np.zeros((64, 64, 3), np.uint8)], 4, "3 channel"),
    ([np.zeros((64, 64, 1), np.float32)], 4, "float32"),
    ([np.zeros((64, 64, 1), np.uint8)], 0, ">= 1"),
])
def test_calibration_tiles_reject_bad_input(images, count, reason):
    with pytest.raises(ValueError, match=reason):
        calibration_tiles(images, (32, 32), 1, count=count)


# ---------------------------------------------------------------- the INT8 graph in the bundle

def test_bundle_entry_has_its_own_sha256_and_record(tiny_bundle_int8):
    meta = read_bundle(tiny_bundle_int8)  # verifies every sha256
    entry = meta.files["onnx_int8"]
    assert entry["path"] == "model.int8.onnx" and len(entry["sha256"]) == 64
    assert carried_precisions(meta) == {"fp32", "int8"}
    record = entry["quantization"]
    assert record["format"] == "QDQ" and "per-channel" in record["weights"] and "7-bit" in record["weights"]
    assert record["calibration"]["tiles"] == 16 and record["calibration"]["source"] == "synthetic textures"
    assert record["op_types"] == ["Conv", "ConvTranspose", "MatMul", "Gemm"]


def test_fp32_graph_untouched_and_old_bundles_read(tiny_bundle, tiny_bundle_int8):
    old, new = read_bundle(tiny_bundle), read_bundle(tiny_bundle_int8)
    assert new.files["onnx"] == old.files["onnx"] and new.files["torch"] == old.files["torch"]
    assert "onnx_int8" not in old.files and carried_precisions(old) == {"fp32"}
    with pytest.raises(BundleError, match="carries no int8"):
        onnx_file(tiny_bundle, old, "int8")


def _nodes(path):
    return onnx.load(str(path)).graph.node


def _scoped(nodes):
    return sorted((n.name, n.op_type) for n in nodes if any(s in n.name for s in FP32_SCOPES)
                  and n.op_type not in ("QuantizeLinear", "DequantizeLinear"))


def test_only_core_matrix_ops_are_quantised(tiny_bundle, tiny_bundle_int8):
    fp32 = _nodes(tiny_bundle / "model.onnx")
    int8 = _nodes(tiny_bundle_int8 / "model.int8.onnx")
    assert _scoped(fp32) and _scoped(fp32) == _scoped(int8)  # pre/post-processing nodes untouched
    produced_by = {out: n for n in int8 for out in n.output}
    consumers = {}
    for node in int8:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    first, last = (next(n for n in int8 if n.name == f"/core/body/body.{i}/Conv") for i in (0, 3))
    assert produced_by[first.input[0]].name == "/preprocess/Add"  # the input layer stays FP32 (KEEP_FP32)
    assert first.input[1] not in produced_by  # its FP32 weight initializer
    # activation and weight of the other convolution come through DequantizeLinear
    assert all(produced_by[name].op_type == "DequantizeLinear" for name in last.input[:2])
    for dq in (n for n in int8 if n.op_type == "DequantizeLinear"):  # every DQ feeds a quantised node
        assert {c.op_type for c in consumers[dq.output[0]]} <= {"Conv", "Relu"}, dq.name
    for node in int8:  # nothing in the FP32 scopes reads a dequantised tensor
        if any(s in node.name for s in FP32_SCOPES) and node.op_type != "QuantizeLinear":
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "DequantizeLinear"
                       for i in node.input), node.name


def test_tail_outputs_keep_fp32(tiny_bundle_int8):
    """The last Conv's output feeds only the FP32 tail (Abs, post-processing): no Q/DQ pair on it."""
    int8 = _nodes(tiny_bundle_int8 / "model.int8.onnx")
    last = next(n for n in int8 if n.name == "/core/body/body.3/Conv")
    assert [n.op_type for n in int8 if last.output[0] in n.input] == ["Abs"]
    record = read_bundle(tiny_bundle_int8).files["onnx_int8"]["quantization"]
    assert record["fp32_tail_readers"] == 1 and record["fp32_layers"] == ["input", "depthwise"]


def test_quantize_all_quantises_the_input_layer(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    meta = quantize_bundle(copy, _textures(2), count=4, keep_fp32=())
    int8 = _nodes(copy / "model.int8.onnx")
    produced_by = {out: n for n in int8 for out in n.output}
    first = next(n for n in int8 if n.name == "/core/body/body.0/Conv")
    assert produced_by[first.input[0]].op_type == "DequantizeLinear"
    assert [n.op_type for n in int8 if first.output[0] in n.input] == ["QuantizeLinear"]  # for QLinearConv
    assert meta.files["onnx_int8"]["quantization"]["fp32_layers"] == []
    with pytest.raises(ValueError, match="keep_fp32 takes input, depthwise"):
        quantize_bundle(copy, _textures(2), count=4, keep_fp32=("stem",))


def test_int8_graph_runs_close_to_fp32(tiny_bundle, tiny_bundle_int8):
    tiles = np.stack(_textures(4, size=32, seed=9))
    paths = {"fp32": tiny_bundle / "model.onnx", "int8": tiny_bundle_int8 / "model.int8.onnx"}
    run = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {ONNX_INPUT: tiles})[0] for name, path in paths.items()}
    assert run["int8"].dtype == np.float32 and run["int8"].shape == run["fp32"].shape
    span = float(run["fp32"].max() - run["fp32"].min())
    assert float(np.abs(run["int8"] - run["fp32"]).max()) < 0.05 * span
    assert not np.array_equal(run["int8"], run["fp32"])  # it really is the quantised graph


def test_edited_int8_graph_is_caught(tiny_bundle_int8, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_int8, copy)
    with open(copy / "model.int8.onnx", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match=r"model.int8.onnx \(onnx_int8\) has sha256"):
        read_bundle(copy)


def test_write_bundle_json_keeps_extra_entry_keys(tiny_bundle_int8, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_int8, copy)
    meta = read_bundle(copy)
    write_bundle_json(copy, meta)
    assert read_bundle(copy).files == meta.files


def test_requantising_replaces_the_graph(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    first = quantize_bundle(copy, _textures(2), count=4, seed=0).files["onnx_int8"]
    second = quantize_bundle(copy, _textures(2), count=4, seed=1, reduce_range=False).files["onnx_int8"]
    assert first["sha256"] != second["sha256"] and "7-bit" not in second["quantization"]["weights"]
    assert not list(copy.glob("*.partial"))


def test_quantize_rejects_wrong_channels(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with pytest.raises(ValueError, match="3 channel"):
        quantize_bundle(copy, _textures(2, channels=3), count=2)
    assert "onnx_int8" not in read_bundle(copy).files and not (copy / "model.int8.onnx").exists()


# ---------------------------------------------------------------- edge-engines quantize, export hook

def _image_folder(path, n=3, channels=1):
    path.mkdir()
    for i, image in enumerate(_textures(n, channels=channels)):
        cv2.imwrite(str(path / f"{i}.png"), image)
    return path


def test_cli_quantize_from_a_folder(tiny_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    folder = _image_folder(tmp_path / "good")
    assert cli.main(["quantize", "--bundle", str(copy), "--images", str(folder), "--tiles", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["int8"] == "model.int8.onnx" and out["calibration"]["tiles"] == 6
    assert out["calibration"]["source"] == f"folder {folder}" and out["calibration"]["images"] == 3
    assert read_bundle(copy).files["onnx_int8"]["sha256"] == out["sha256"]


@pytest.mark.parametrize("case, reason", [
    ("missing-folder", "does not exist"),
    ("colour-images", "channel"),
    ("no-bundle", "does not exist"),
])
def test_cli_quantize_errors_are_one_line(tiny_bundle, tmp_path, capsys, case, reason):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    folder = tmp_path / "nope"
    if case == "colour-images":
        folder = _image_folder(tmp_path / "rgb", channels=3)
    if case == "no-bundle":
        bundle, folder = tmp_path / "no-bundle", _image_folder(tmp_path / "good")
    assert cli.main(["quantize", "--bundle", str(bundle), "--images", str(folder)]) == 2  # bad input
    err = capsys.readouterr().err
    assert err.startswith("edge-engines quantize: error: ") and reason in err and err.count("\n") == 1


def test_cli_quantize_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    text = capsys.readouterr().out
    options = ("--bundle", "--images", "--elpv", "--tiles", "--limit", "--method", "--full-range",
               "--anomaly-fraction", "--quantize-all", "--seed")
    for option in options:
        assert option in text


def test_export_hook_writes_the_int8_graph(tmp_path):
    from tests.test_export import StandIn, _images
    from trainer.calibrate import Thresholds, map_spec_from_raw
    from trainer.evaluate import raw_maps
    from trainer.export import export_model

    model = StandIn()
    spec = map_spec_from_raw(raw_maps(model, _images(3, 32, 1)), model.map_weights, 32)
    meta = export_model(model, tmp_path, tile=32, channels=1, map_spec=spec, thresholds=Thresholds(0.3, 0.4),
                        int8_images=_textures(2))
    assert carried_precisions(meta) == {"fp32", "int8"}
    assert meta.files["onnx_int8"]["quantization"]["calibration"]["source"] == "training images at export"
    assert meta == read_bundle(tmp_path)


@pytest.mark.slow
def test_cli_quantize_from_elpv_training_cells(tiny_bundle, tmp_path, capsys):
    """--elpv: the good training cells of the documented split (loads the whole ELPV package: ~10 s)."""
    pytest.importorskip("elpv_dataset", reason="elpv-dataset is not installed (edge-inspect[dev])")
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    argv = ["quantize", "--bundle", str(copy), "--elpv", "mono", "--limit", "6", "--tiles", "6"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"]["images"] == 6 and out["calibration"]["source"].startswith("elpv mono training")
    assert read_bundle(copy).files["onnx_int8"]["sha256"] == out["sha256"]
