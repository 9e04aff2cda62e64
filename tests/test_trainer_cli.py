"""edge-train: bad input gives one clear line and exit 2; train -> evaluate -> export end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from engines.bundle import read_bundle
from trainer.cli import main
from trainer.data.synthetic import write_mvtec_tree


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_tree(root, "weave", size=64, n_train=8, n_test_good=3, n_test_defect=2, channels=1)
    return root


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    return err[0]


def _folder(tmp_path, name, images):
    folder = tmp_path / name
    folder.mkdir()
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i}.png"), image)
    return folder


TRAIN = ["train", "--kind", "dfr", "--option", "pretrained=false", "--steps", "2", "--tile", "64"]


def test_missing_folder(capsys, tmp_path):
    argv = TRAIN + ["--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    _fails(capsys, argv, "does not exist")


def test_no_images(capsys, tmp_path):
    _fails(capsys, TRAIN + ["--folder", str(tmp_path), "--out", str(tmp_path / "o")], "no images")


def test_unreadable_image(capsys, tmp_path):
    folder = _folder(tmp_path, "f", [np.zeros((64, 64), np.uint8)])
    (folder / "z.png").write_bytes(b"garbage")
    _fails(capsys, TRAIN + ["--folder", str(folder), "--out", str(tmp_path / "o")], "cannot read image")


def test_wrong_channel_count(capsys, tmp_path):
    folder = _folder(tmp_path, "f", [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.uint8)])
    _fails(capsys, TRAIN + ["--folder", str(folder), "--out", str(tmp_path / "o")], "channel")


def test_tile_larger_than_image(capsys, tmp_path):
    folder = _folder(tmp_path, "f", [np.zeros((32, 32), np.uint8)] * 3)
    _fails(capsys, TRAIN + ["--folder", str(folder), "--out", str(tmp_path / "o")], "tile 64 is larger")


def test_mismatched_mask(capsys, tmp_path):
    write_mvtec_tree(tmp_path, "weave", size=64, n_train=3, n_test_good=1, n_test_defect=1, channels=1)
    cv2.imwrite(str(tmp_path / "weave/ground_truth/spot/000_mask.png"), np.zeros((32, 32), np.uint8))
    argv = TRAIN + ["--mvtec", str(tmp_path), "--category", "weave", "--out", str(tmp_path / "o")]
    _fails(capsys, argv, "is 32x32")


def test_corrupt_checkpoint_and_teacher(capsys, tmp_path, mvtec):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    data = ["--mvtec", str(mvtec), "--category", "weave"]
    _fails(capsys, ["evaluate", "--checkpoint", str(bad)] + data, "corrupt")
    _fails(capsys, ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "o")] + data, "corrupt")
    argv = ["train", "--kind", "efficientad", "--tile", "64", "--teacher", str(bad),
            "--out", str(tmp_path / "o")]
    _fails(capsys, argv + data, "corrupt")


def test_help_in_subprocess():
    out = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for option in ("--mvtec", "--folder", "--elpv", "--tile", "--steps", "--seed", "--option", "--out",
                   "--teacher"):
        assert option in out


@pytest.mark.slow  # ~25-50 s on 2 shared cores: three ONNX/torch.export exports of a real DFR
def test_train_evaluate_export_dfr(capsys, tmp_path, mvtec):
    data = ["--mvtec", str(mvtec), "--category", "weave", "--val-fraction", "0.25"]
    out = tmp_path / "bundle"
    assert main(TRAIN + ["--steps", "5"] + data + ["--out", str(out)]) == 0
    meta = read_bundle(out)
    assert meta.kind == "dfr" and meta.input.channels == 1 and meta.map.height == 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and "au_pro_0.3" in metrics and "pixel_auroc" in metrics
    assert meta.image_threshold == pytest.approx(metrics["thresholds"]["image"])
    assert (out / "report.png").stat().st_size > 0 and (out / "checkpoint.pt").is_file()
    capsys.readouterr()
    # the bundle through ONNX Runtime: same images as the tile, so the same metrics as training reported
    assert main(["evaluate", "--bundle", str(out)] + data + ["--out", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert evaluated["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-4)
    # re-export from the checkpoint: same calibration data, same thresholds
    argv = ["export", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "b2")]
    assert main(argv + data) == 0
    again = read_bundle(tmp_path / "b2")
    assert again.image_threshold == pytest.approx(meta.image_threshold, rel=1e-5)
    assert again.map.q_b == pytest.approx(meta.map.q_b, rel=1e-5)


@pytest.mark.slow
def test_train_efficientad_with_teacher(tmp_path, mvtec):
    teacher = tmp_path / "teacher.pt"
    images = str(mvtec / "weave" / "train" / "good")
    assert main(["pretrain-teacher", "--images", images, "--tile", "64", "--steps", "3", "--batch-size", "2",
                 "--out", str(teacher)]) == 0
    out = tmp_path / "bundle"
    assert main(["train", "--kind", "efficientad", "--tile", "64", "--steps", "3", "--teacher", str(teacher),
                 "--mvtec", str(mvtec), "--category", "weave", "--out", str(out)]) == 0
    meta = read_bundle(out)
    assert meta.kind == "efficientad" and len(meta.map.q_a) == 2
