"""benchmarks/dfr_ablation.py end to end on a tiny texture set: every setting and baseline gets its AUROCs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage", reason="the texture set reads the photos shipped with scikit-image ([dev])")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dfr_ablation  # noqa: E402

from trainer.data.textures import write_texture_tree  # noqa: E402


@pytest.mark.slow  # two tiny DFR trainings on 64 px crops: ~10 s on an idle 2-core CPU
def test_ablation_writes_a_table_for_every_setting(tmp_path, capsys):
    write_texture_tree(tmp_path / "tex", "brick", size=64, n_train=6, n_test_good=3, n_test_defect=2)
    tiny = '{"model": {"taps": [4, 8]}, "train": {"steps": 2, "vectors": 64}}'
    assert dfr_ablation.main(["--data", str(tmp_path / "tex"), "--categories", "brick", "--baselines",
                              "--define", f"tiny={tiny}", "--settings", "tiny", "--threads", "1",
                              "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(result["results"]) == {"z-score position", "z-score patch", "tiny"}
    aurocs = result["results"]["tiny"]["brick"]["auroc"]
    assert set(aurocs) == {"all", "scratch", "stain", "swap"} and all(0 <= v <= 1 for v in aurocs.values())
    assert "ISA" in result["machine"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| tiny |" in table and "brick stain" in table
    with pytest.raises(SystemExit, match="unknown settings"):
        dfr_ablation.main(["--settings", "nope", "--no-textures", "--out", str(tmp_path / "x")])
