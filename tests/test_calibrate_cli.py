"""`edge-train calibrate`: thresholds re-set from folders of good (and defective) images without retraining,
scored exactly as the daemon scores frames; small samples warned about; bundle stays verifiable."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from engines.bundle import read_bundle
from engines.registry import open_engine
from inspection.pipeline import inspect_frame
from trainer.calibrate import estimate_threshold
from trainer.cli import main
from trainer.scoring import config_for


def _write(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    return folder


def _good(rng, n, size=48):
    return [rng.integers(100, 140, size=(size, size), dtype=np.uint8) for _ in range(n)]


def _defective(rng, n, size=48):
    out = []
    for image in _good(rng, n, size):
        y, x = rng.integers(4, size - 12, size=2)
        image[y:y + 8, x:x + 8] = 255
        out.append(image)
    return out


@pytest.fixture
def bundle(tmp_path, tiny_bundle):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def test_calibrate_good_and_defective(capsys, tmp_path, bundle):
    rng = np.random.default_rng(0)
    good = _write(tmp_path / "good", _good(rng, 12))
    bad = _write(tmp_path / "bad", _defective(rng, 6))
    before = read_bundle(bundle)
    assert main(["calibrate", "--bundle", str(bundle), "--good", str(good), "--defective", str(bad)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "12 good images cannot resolve a false-reject rate of 0.01" in warnings[0]
    after = read_bundle(bundle)  # checksums still verify
    cal = after.calibration
    assert cal["n_good"] == 12 and cal["n_defective"] == 6
    assert cal["image_threshold"]["resolvable"] is False and cal["image_threshold"]["warning"]
    assert cal["previous"]["image_threshold"] == before.image_threshold
    assert after.image_threshold != before.image_threshold
    assert after.pixel_threshold <= after.image_threshold
    assert "miss rate on 6 defective images" in out
    assert (bundle / "calibration.png").stat().st_size > 10_000

    # the threshold rests on the daemon's own scores of those images
    engine = open_engine(bundle, backend="onnxruntime", max_batch=8, streams=1)
    try:
        images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(good.glob("*.png"))]
        config = config_for(engine)  # the recorded scoring settings (tile overlap 8 for 32 px tiles)
        assert config.tile_overlap == 8 and after.calibration["scoring"]["tile_overlap"] == 8
        scores = [inspect_frame(engine, im, config).score for im in images]
        bad_images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(bad.glob("*.png"))]
        verdicts = [inspect_frame(engine, im, config) for im in bad_images]
    finally:
        engine.close()
    assert after.image_threshold == pytest.approx(estimate_threshold(scores, 0.01).value, rel=1e-6)
    assert all(v.regions for v in verdicts if v.verdict == "FAIL")


def test_calibrate_dry_run_leaves_the_bundle(capsys, tmp_path, bundle):
    good = _write(tmp_path / "good", _good(np.random.default_rng(1), 6))
    before = (bundle / "bundle.json").read_text()
    assert main(["calibrate", "--bundle", str(bundle), "--good", str(good), "--dry-run",
                 "--report", str(tmp_path / "r.png")]) == 0
    assert (bundle / "bundle.json").read_text() == before
    assert (tmp_path / "r.png").is_file() and "dry run" in capsys.readouterr().out


def test_calibrate_enough_images_is_empirical(capsys, tmp_path, bundle):
    good = _write(tmp_path / "good", _good(np.random.default_rng(2), 64, size=32))
    assert main(["calibrate", "--bundle", str(bundle), "--good", str(good), "--frr", "0.05"]) == 0
    assert "warning" not in capsys.readouterr().err
    record = json.loads((bundle / "bundle.json").read_text())["calibration"]
    assert record["image_threshold"]["estimator"] == "empirical" and record["n_good"] == 64


def test_calibrate_bad_input_is_one_line(capsys, tmp_path, bundle):
    assert main(["calibrate", "--bundle", str(bundle), "--good", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["calibrate", "--bundle", str(tmp_path / "nobundle"), "--good", str(tmp_path)]) == 2
