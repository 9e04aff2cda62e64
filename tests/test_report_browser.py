"""The demo's HTML report in a real headless browser (Debian's chromium; .ci/run installs it): every frame is
a card, the cards sort by score, and the screenshot is not empty and shows the heat maps' colour bars.

Skips, saying so, where no chromium is installed (`apt-get install chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.report import FrameOutcome, summarize, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


@pytest.fixture(scope="module")
def chromium():
    path = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A demo report of 7 frames: 6 verdicts (3 FAIL with a region each) and 1 drop."""
    out = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 100, 100), (100, 0, 100, 100)]
    outcomes, images, maps, defects = [], {}, {}, {}
    scores = [0.03, 0.01, 0.05, 0.02, 0.06, 0.04]
    for i, score in enumerate(scores):
        bad = score >= 0.04
        regions = ({"x": 20, "y": 20, "w": 30, "h": 30, "area": 900, "peak": score, "mean": score / 2},) \
            if bad else ()
        outcomes.append(FrameOutcome(i, bad, int(bad), "verdict", "FAIL" if bad else "PASS", score, 0.04,
                                     90.0 + i, "", regions))
        images[i] = rng.integers(60, 200, (100, 200), dtype=np.uint8)
        amap = np.zeros((25, 50), np.float32)
        amap[5:12, 5:12] = score * 2
        maps[i], defects[i] = amap, np.array([[bad, False]])
    outcomes.append(FrameOutcome(6, False, 0, "drop", reason="queue full"))
    images[6], defects[6] = images[0], defects[0]
    paths = write_report(out, outcomes, summarize(outcomes), images, maps, defects, boxes, {"model": "test"},
                         2)
    return paths["html"], outcomes


def _cards(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<figure class="card [^"]*" data-frame="(\d+)"', dom)]


def test_cards_sort_in_the_browser(chromium, report, tmp_path):
    """#score-asc: lowest score first (the drop, which has none, before all); written in frame order."""
    page, outcomes = report
    assert _cards(page.read_text().replace("'", '"')) == [0, 1, 2, 3, 4, 5, 6]
    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", f"{page.as_uri()}#score-asc").stdout
    assert _cards(dom) == [6, 1, 3, 0, 5, 2, 4] and len(outcomes) == 7  # every frame, sorted by the script
    assert f"{len(outcomes)} frames, sorted by" in dom  # the page's script ran
    assert dom.count('alt="fused heat map') == 6  # a heat map with its colour bar per verdict


def test_screenshot_is_not_empty(chromium, report, tmp_path):
    page, _ = report
    shot = tmp_path / "shot.png"
    _browser(chromium, tmp_path / "profile", "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri())
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2600, 1200)
    assert image.std() > 20 and (image < 230).any(axis=2).mean() > 0.05  # text and pictures, not blank
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    saturated = (hsv[:, :, 1] > 150) & (hsv[:, :, 2] > 100)
    assert saturated.sum() > 2000  # the jet colour bars and heat maps were decoded and drawn
    rows = np.flatnonzero(saturated.sum(axis=1) > 5)
    bands = 1 + int((np.diff(rows) > 20).sum()) if rows.size else 0
    assert bands >= 6  # one band of colour per card with a heat map (cards stack in a column at this width)
