"""Accuracy guard of the reduced CPU precisions (benchmarks/precision_guard.py), in the default run.

A tiny student-teacher model (EfficientAD in miniature) is trained in seconds on synthetic textures
(trainer.data.synthetic), calibrated, and exported with trainer.export.export_model(int8_images=...) (the
export hook: model.int8.onnx calibrated on the training images); held-out good textures and textures with
spots of graded strength then run through every reduced precision this machine has. Each must keep image
scores at Spearman >= 0.99 against ONNX Runtime FP32 and image AUROC within 0.005; verdict flips at the
bundle's threshold are counted and must stay within the guard's budget (GUARD_MAX_FLIPS). bf16 rows skip,
with the reason, on CPUs without native BF16.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.precision_guard import (
    MAX_AUROC_DELTA,
    MIN_SPEARMAN,
    REFERENCE,
    guard_row,
    markdown,
    run_guard,
    spearman,
)
from engines import registry
from engines.bundle import carried_precisions, read_bundle, verified_precisions
from engines.cpuinfo import bf16_isa, read_cpuinfo
from engines.quantize import calibration_tiles
from trainer.data.synthetic import textured_image

HERE = read_cpuinfo()
OPENVINO = pytest.mark.skipif(not registry.openvino_available(), reason="openvino is not installed")
BF16 = pytest.mark.skipif(bf16_isa(HERE.flags) is None,
                          reason=f"needs a CPU with AMX-BF16 or AVX512-BF16; this one: {HERE.summary()}")
GUARD_MAX_FLIPS = 1  # of the synthetic test images, at the bundle's own threshold


# ---------------------------------------------------------------- the pure parts

def test_spearman_against_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share ranks
    assert spearman([5, 5], [5, 5]) == 1.0 and np.isnan(spearman([5, 5], [1, 2]))
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1, 2], [1, 2, 3])


def test_guard_row_counts_flips_both_ways():
    labels = np.array([0, 0, 0, 1, 1, 1])
    headline = np.ones(6, bool)
    ref = np.array([0.1, 0.2, 0.45, 0.55, 0.8, 0.9])
    moved = np.array([0.1, 0.2, 0.51, 0.49, 0.8, 0.9])  # one good crosses up, one defect crosses down
    row = guard_row(ref, moved, labels, headline, threshold=0.5)
    assert (row["flips"], row["pass_to_fail"], row["fail_to_pass"]) == (2, 1, 1)
    assert row["auroc_fp32"] == 1.0 and row["auroc_delta"] < -MAX_AUROC_DELTA and not row["ok"]
    same = guard_row(ref, ref + 1e-4, labels, headline, threshold=0.5)
    assert same["ok"] and same["flips"] == 0 and same["spearman"] == pytest.approx(1.0)


def test_markdown_table_names_cpu_and_unavailable_rows():
    rows = [{"spec": REFERENCE, "engine": "onnxruntime/fp32", "spearman": 1.0, "auroc": 0.9,
             "auroc_delta": 0.0, "flips": 0, "images": 10, "pass_to_fail": 0, "fail_to_pass": 0, "ok": True},
            {"spec": "openvino:bf16", "unavailable": "needs AMX"}]
    text = markdown(rows, "Some CPU; ISA: avx2", "Guard")
    assert "CPU: Some CPU; ISA: avx2" in text
    assert "| onnxruntime/fp32 | 1.0000 | 0.9000 | +0.0000 | 0 of 10" in text
    assert "| openvino:bf16 | - | - | - | - | not run: needs AMX |" in text


# ---------------------------------------------------------------- trained tiny model, every reduced precision

class TinyStudentTeacher(nn.Module):
    """EfficientAD in miniature: a frozen random PDN-like teacher, a student trained to match it on good
    tiles; map = channel mean of the squared difference, at stride 4."""

    kind, size, num_maps, map_stride, map_weights = "tiny-st", "xs", 1, 4, (1.0,)
    input_mean, input_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.teacher, self.student = self._pdn(), self._pdn()
        self.teacher.requires_grad_(False)

    @staticmethod
    def _pdn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Conv2d(32, 32, 3, padding=1))

    def forward(self, x):
        return ((self.teacher(x) - self.student(x)) ** 2).mean(dim=1, keepdim=True)


def _fit(model: TinyStudentTeacher, images: list[np.ndarray], tile: int, steps: int = 60) -> None:
    from engines.bundle import InputSpec
    from engines.graph import Preprocess

    pre = Preprocess(InputSpec(tile, tile, 1, model.input_mean, model.input_std))
    crops = calibration_tiles(images, (tile, tile), 1, count=steps * 8, seed=1, anomaly_fraction=0)
    optimiser = torch.optim.Adam(model.student.parameters(), lr=5e-3)
    for step in range(steps):
        x = pre(torch.from_numpy(crops[step * 8:(step + 1) * 8]))
        loss = model(x).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _graded_defects(rng, count: int, size: int) -> list[np.ndarray]:
    """Textures with a bright spot of graded strength and size: defect scores spread, not one cluster."""
    images = []
    for i in range(count):
        image = textured_image(size, rng, channels=1)
        mask = np.zeros(image.shape[:2], np.uint8)
        centre = tuple(int(v) for v in rng.integers(12, size - 12, size=2))
        cv2.circle(mask, centre, 3 + i % 3, 1, -1)
        offset = 60 + 100 * i // count
        image[mask > 0] = np.clip(image[mask > 0].astype(np.int16) + offset, 0, 255).astype(np.uint8)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(bundle, test set): the tiny student-teacher, trained in seconds, exported with the INT8 hook."""
    from trainer.calibrate import calibrate, map_spec_from_raw
    from trainer.data import GOOD, EvalSet
    from trainer.evaluate import model_scored, raw_maps
    from trainer.export import export_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train = [textured_image(64, rng, channels=1) for _ in range(8)]
    val = [textured_image(64, rng, channels=1) for _ in range(6)]
    model = TinyStudentTeacher()
    _fit(model, train, tile=32)
    model.eval()
    spec = map_spec_from_raw(raw_maps(model, val), model.map_weights, 32, stride=4)
    scored = model_scored(model, val, 1, 32, spec)
    thresholds = calibrate(scored.scores, scored.maps).thresholds
    bundle = tmp_path_factory.mktemp("guard") / "bundle"
    export_model(model, bundle, tile=32, channels=1, map_spec=spec, thresholds=thresholds, int8_images=train)
    good = [textured_image(64, rng, channels=1) for _ in range(12)]
    defects = _graded_defects(rng, 12, 64)
    test = EvalSet(images=good + defects, labels=np.array([0] * 12 + [1] * 12),
                   groups=(GOOD,) * 12 + ("spot",) * 12, names=tuple(f"{i}" for i in range(24)))
    return bundle, test


def test_training_exported_the_int8_graph(trained):
    bundle, _ = trained
    meta = read_bundle(bundle)
    assert carried_precisions(meta) == {"fp32", "int8"}
    assert meta.files["onnx_int8"]["quantization"]["calibration"]["source"] == "training images at export"


@pytest.mark.parametrize("spec", [
    pytest.param("onnxruntime:int8", id="onnxruntime-int8"),
    pytest.param("openvino:fp32", id="openvino-fp32", marks=OPENVINO),
    pytest.param("openvino:bf16", id="openvino-bf16", marks=[OPENVINO, BF16]),
    pytest.param("openvino:int8", id="openvino-int8", marks=OPENVINO),
])
def test_reduced_precision_keeps_scores_auroc_and_verdicts(trained, spec):
    bundle, test = trained
    reference, row = run_guard(bundle, test, [spec], threads=1)
    assert reference["spearman"] == pytest.approx(1.0) and reference["flips"] == 0
    assert reference["auroc_fp32"] > 0.9, "the tiny model must separate defects for the guard to mean much"
    assert "unavailable" not in row, row.get("unavailable")
    assert row["spearman"] >= MIN_SPEARMAN, row
    assert abs(row["auroc_delta"]) <= MAX_AUROC_DELTA, row
    assert row["flips"] <= GUARD_MAX_FLIPS, row
    assert row["engine"].endswith(spec.split(":")[1])


def test_benchmark_script_prints_the_table_and_writes_json(tiny_bundle_int8, tmp_path, capsys):
    """benchmarks/precision_guard.py end to end on an MVTec-layout folder (tiny untrained bundle)."""
    from benchmarks.precision_guard import main
    from trainer.data.synthetic import write_mvtec_tree

    write_mvtec_tree(tmp_path / "data", "weave", size=48, n_train=3, n_test_good=3, n_test_defect=2,
                     channels=1)
    out = tmp_path / "guard.json"
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_int8, bundle)
    rc = main(["--bundle", str(bundle), "--mvtec", str(tmp_path / "data"), "--category", "weave",
               "--engines", "onnxruntime:int8,openvino:bf16", "--threads", "1", "--json", str(out),
               "--record"])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"CPU: {HERE.summary()}" in text and "| precision | Spearman vs FP32 |" in text
    assert [r["spec"] for r in report["rows"]] == [REFERENCE, "onnxruntime:int8", "openvino:bf16"]
    assert report["cpu"]["isa"] == list(HERE.isa) and report["rows"][0]["images"] == 7
    int8 = report["rows"][1]
    assert int8["engine"] == "onnxruntime/int8" and f"| onnxruntime/int8 | {int8['spearman']:.4f} |" in text
    assert rc == (0 if all(r.get("ok", True) for r in report["rows"]) else 1)
    if bf16_isa(HERE.flags) is None:
        assert "not run: OpenVINO would run f32, not bf16" in text
    guard = read_bundle(bundle).files["onnx_int8"]["guard"]  # --record, and the bundle still verifies
    assert guard["ok"] == int8["ok"] and guard["rows"][0]["spec"] == "onnxruntime:int8"
    assert ("int8" in verified_precisions(read_bundle(bundle))) == int8["ok"]
    assert f"int8 guard {'passed' if int8['ok'] else 'FAILED'}" in text
