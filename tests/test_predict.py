"""edge-inspect predict: per image the daemon's own verdict (inspect_frame with an engine from open_engine),
JSON lines, a table, and a heat-map picture with a colour bar; edge-inspect samples."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge_inspect.cli import main
from edge_inspect.overlay import colour_bar, inspection_picture
from edge_inspect.predict import list_inputs, read_frame
from edge_inspect.samples import MARKER, SampleCounts, write_samples
from engines.registry import open_engine
from inspection.pipeline import InspectConfig, inspect_frame


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    frames = {"a.png": rng.integers(0, 255, (48, 80), dtype=np.uint8),
              "b.bmp": np.full((40, 40), 128, np.uint8),
              "c.tif": (rng.integers(0, 65535, (36, 36))).astype(np.uint16)}
    for name, frame in frames.items():
        cv2.imwrite(str(folder / name), frame)
    (folder / "notes.txt").write_text("not an image")
    return folder, frames


def test_predict_matches_the_daemon_pipeline(tiny_bundle, images, tmp_path, capsys):
    folder, frames = images
    out = tmp_path / "out"
    argv = ["predict", "--bundle", str(tiny_bundle), str(folder), "--out", str(out), "--threshold", "0.3"]
    assert main(argv) == 2  # the default overlap (32) does not fit 32-pixel tiles: said once, up front
    assert "tile_overlap 32 is impossible" in capsys.readouterr().err
    assert main(argv + ["--overlap", "8", "--backend", "onnxruntime"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["image", "verdict", "score"] and len(table) == 1 + len(frames)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == [str(folder / n) for n in sorted(frames)]
    engine = open_engine(tiny_bundle, backend="onnxruntime")
    try:
        for line in lines:
            expected = inspect_frame(engine, read_frame(folder / line["image"].split("/")[-1]),
                                     InspectConfig(image_threshold=0.3, tile_overlap=8))
            assert line["verdict"] == expected.verdict and line["score"] == pytest.approx(expected.score)
            assert line["threshold"] == 0.3 and len(line["regions"]) == len(expected.regions)
            picture = cv2.imread(line["picture"])
            frame = read_frame(folder / line["image"].split("/")[-1])
            assert picture.shape[0] == frame.shape[0] and picture.shape[1] > frame.shape[1]  # + colour bar
    finally:
        engine.close()


def test_predict_jsonl_and_bad_images(tiny_bundle, images, tmp_path, capsys):
    folder, _ = images
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--bundle", str(tiny_bundle), str(folder), "--jsonl", "--overlap", "0", "--out",
                 str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 4 and rows[2]["image"].endswith("broken.png") and "cannot read" in rows[2]["error"]
    assert all("verdict" in r for r in rows if "error" not in r)
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("edge-inspect predict: error: 1 image(s) could not be inspected")
    assert "fix:" in err[-1]
    assert main(["predict", "--bundle", str(tiny_bundle), str(tmp_path / "nothing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_list_inputs_rejects_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        list_inputs([tmp_path])


def test_picture_has_a_colour_bar_with_the_threshold():
    frame = np.zeros((120, 200), np.uint8)
    amap = np.zeros((30, 50), np.float32)
    amap[10:15, 10:15] = 1.0
    pic = inspection_picture(frame, amap, [{"x": 40, "y": 40, "w": 20, "h": 20}], vmax=1.0, threshold=0.5)
    bar = colour_bar(120, 1.0, 0.5)
    assert pic.shape == (120, 200 + bar.shape[1], 3)
    assert (pic[:, 200:] == bar).all()
    assert tuple(pic[40, 45]) == (255, 40, 40)  # the region's outline, red
    column = bar[:, 8].astype(int)  # inside the ramp: red at the top, blue at the bottom
    assert column[15, 0] > 100 > column[15, 2] and column[-20, 2] > 100 > column[-20, 0]


def test_samples_synthetic_layout_and_rewrite(tmp_path, capsys):
    out = tmp_path / "s"
    counts = SampleCounts(good=3, test_good=2, test_defect=2)
    written = write_samples(out, "synthetic", counts)
    assert written == {"good": 3, "test/good": 2, "test/scratch": 2, "test/spot": 2}
    assert len(list((out / "test" / "ground_truth" / "spot").glob("*_mask.png"))) == 2
    assert (out / MARKER).is_file()
    write_samples(out, "synthetic", counts)  # its own folder: rewritten
    other = tmp_path / "mine"
    other.mkdir()
    (other / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not written by"):
        write_samples(other, "synthetic", counts)
