"""edge-inspect demo: module frames and their ground truth, the summary, the cache key, and the real path end
to end in --quick mode (a small memory bank, export, daemon subprocess, camera process, summary, report)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_inspect import demo as demo_mod
from edge_inspect.cli import build_parser, settings_from_args
from edge_inspect.modules import ModuleLayout, cell_boxes, compose, draw_modules, good_modules, joint_zones
from edge_inspect.report import FrameOutcome, format_summary, pick_frames, summarize
from edge_inspect.train import QUICK, TrainSettings, cached_model


def _cells(n, value0=0, size=8):
    return [np.full((size, size), value0 + i, dtype=np.uint8) for i in range(n)]


def test_compose_places_cells_row_major():
    layout = ModuleLayout(2, 3, cell=8)
    frame = compose(_cells(6, 10), layout)
    assert frame.shape == (16, 24)
    for i, (x, y, w, h) in enumerate(cell_boxes(layout)):
        assert (frame[y:y + h, x:x + w] == 10 + i).all()
    with pytest.raises(ValueError, match="needs 6 cells"):
        compose(_cells(5), layout)


def test_compose_resizes_and_squeezes_cells():
    layout = ModuleLayout(1, 2, cell=8)
    frame = compose([np.full((16, 16, 1), 7, np.uint8), np.full((8, 8), 9, np.uint8)], layout)
    assert frame.shape == (8, 16) and (frame[:, :8] == 7).all() and (frame[:, 8:] == 9).all()


def test_draw_modules_truth_matches_pixels():
    layout = ModuleLayout(2, 2, cell=8)
    good, bad = _cells(10, 0), _cells(5, 200)  # good cells 0..9, defective 200..204
    mods = draw_modules(good, [f"g{i}" for i in range(10)], bad, [f"d{i}" for i in range(5)], layout,
                        count=20, defect_share=0.5, max_defects=2, seed=3)
    assert sum(m.defective for m in mods) == 10
    for m in mods:
        assert 0 <= m.defects.sum() <= 2
        for (x, y, _, _), is_bad, name in zip(cell_boxes(layout), m.defects.flat, m.names, strict=True):
            value = int(m.image[y, x])
            assert (value >= 200) == bool(is_bad) and name[0] == ("d" if is_bad else "g")
    again = draw_modules(good, [f"g{i}" for i in range(10)], bad, [f"d{i}" for i in range(5)], layout,
                         count=20, defect_share=0.5, max_defects=2, seed=3)
    assert all((a.image == b.image).all() for a, b in zip(mods, again, strict=True))


def test_good_modules_use_every_cell_before_reuse():
    layout = ModuleLayout(1, 2, cell=8)
    mods = good_modules(_cells(6), layout, count=3, seed=0)
    values = sorted(int(m[0, x]) for m in mods for x in (0, 8))
    assert values == list(range(6))


def test_joint_zones_cover_cell_edges_only():
    layout = ModuleLayout(2, 3, cell=100)
    mask = np.zeros(layout.shape, dtype=bool)
    for x, y, w, h in joint_zones(layout, 10):
        assert w > 0 and h > 0 and x + w <= 300 and y + h <= 200
        mask[y:y + h, x:x + w] = True
    assert mask[0:10].all() and mask[90:110].all() and mask[190:200].all()  # rows of joints
    assert mask[:, 0:10].all() and mask[:, 90:110].all() and mask[:, 290:300].all()
    assert not mask[10:90, 10:90].any() and not mask[110:190, 210:290].any()  # cell interiors
    assert mask.mean() == pytest.approx(1 - (6 * 80 * 80) / (300 * 200))
    assert joint_zones(layout, 0) == []


def _o(fid, defective, verdict="PASS", kind="verdict", latency=10.0):
    return FrameOutcome(fid, defective, int(defective), kind, verdict if kind == "verdict" else None,
                        0.5, 0.4, latency if kind == "verdict" else None)


def test_summarize_rates_and_counts():
    outcomes = [_o(0, True, "FAIL"), _o(1, True, "PASS"), _o(2, False, "FAIL"), _o(3, False, "PASS"),
                _o(4, False, "PASS"), _o(5, True, kind="drop"), _o(6, False, kind="unanswered")]
    s = summarize(outcomes)
    assert (s["frames"], s["answered"], s["pass"], s["fail"]) == (7, 5, 3, 2)
    assert (s["drops"], s["unanswered"], s["errors"]) == (1, 1, 0)
    assert s["defective_modules"] == 2 and s["detected"] == 1 and s["detection_rate"] == 0.5
    assert s["good_modules"] == 3 and s["false_rejects"] == 1
    assert s["false_reject_rate"] == pytest.approx(1 / 3)
    assert s["latency_ms"]["p50"] == 10.0
    text = format_summary(s)
    assert "detection rate 50 %" in text and "false rejects 1 (33 %)" in text


def test_pick_frames_shows_each_kind_first():
    outcomes = [_o(0, True, "FAIL"), _o(1, True, "PASS"), _o(2, False, "FAIL"), _o(3, False, "PASS"),
                _o(4, True, "FAIL")]
    picks = pick_frames(outcomes, {0, 1, 2, 3, 4}, count=4)
    assert {p.judged for p in picks} == {"hit", "miss", "false-reject", "ok"}
    assert [p.frame_id for p in pick_frames(outcomes, {3}, 4)] == [3]


def test_cache_key_follows_training_settings():
    assert TrainSettings().key() == TrainSettings().key()
    assert TrainSettings(bank_fraction=0.05).key() != TrainSettings().key()
    with pytest.raises(ValueError, match="bank_fraction"):
        TrainSettings(bank_fraction=0)
    # a module of 12 independent cells at the per-cell rate is rejected at the module rate
    s = TrainSettings(module_frr=0.05)
    assert 1 - (1 - s.cell_frr) ** 12 == pytest.approx(0.05)


def test_cached_model_rejects_incomplete_dirs(tmp_path):
    assert cached_model(tmp_path) is None
    (tmp_path / "demo.json").write_text('{"image_threshold": 1.0}')
    assert cached_model(tmp_path) is None  # no bundle


def test_cli_options_map_to_settings(tmp_path):
    args = build_parser().parse_args(["demo", "--quick", "--workdir", str(tmp_path), "--frames", "6",
                                      "--fps", "2.5", "--bank-fraction", "0.05", "--keep-going"])
    s = settings_from_args(args)
    assert s.train == replace(QUICK, bank_fraction=0.05) and s.frames == 6 and s.fps == 2.5 and s.keep_going
    full = settings_from_args(build_parser().parse_args(["demo", "--workdir", str(tmp_path)]))
    assert full.train == TrainSettings() and full.frames == 24


def test_quick_demo_end_to_end(tmp_path, monkeypatch):
    """Train a few steps, export, real daemon, camera process, live table, summary, report; then the
    cached bundle is found without training again."""
    pytest.importorskip("elpv_dataset")
    pytest.importorskip("onnxruntime")
    lines: list[str] = []
    settings = demo_mod.DemoSettings.quick(tmp_path)
    result = demo_mod.run_demo(settings, say=lines.append)
    s = result["summary"]
    assert s["frames"] == settings.frames and s["unanswered"] == 0 and s["errors"] == 0
    assert s["answered"] + s["drops"] == settings.frames
    assert s["defective_modules"] + s["good_modules"] == s["answered"]
    assert s["latency_ms"]["max"] is not None and s["latency_ms"]["max"] > 0
    assert all(o.threshold == pytest.approx(result["model"]["image_threshold"])
               for o in result["outcomes"] if o.kind == "verdict")
    for key in ("png", "html", "json"):
        assert result["paths"][key].stat().st_size > 200
    page = result["paths"]["html"].read_text()
    assert page.count("<figure class='card ") == len(result["outcomes"]) == settings.frames  # every frame
    assert page.count("alt='fused heat map") == s["answered"]  # a heat map with colour bar per verdict
    assert (tmp_path / "bundle" / "bundle.json").is_file() and (tmp_path / "latest" / "report.html").is_file()
    assert not result["interrupted"]
    assert any("detection rate" in line for line in lines)
    assert any(line.startswith("daemon: stopped (exit code 0)") for line in lines)

    def no_training(*a, **k):
        raise AssertionError("the cached bundle should have been used")

    monkeypatch.setattr(demo_mod, "train_demo_model", no_training)
    model = demo_mod.get_model(settings, None, lines.append)
    assert model.bundle == tmp_path / "models" / settings.train.key() / "bundle"
