"""Demo outcome: per-frame results, the summary (pure functions) and the report.

report.html shows every frame as a card (the module with the daemon's regions in red and the defective cells
in green, the fused heat map over it with a colour bar, verdict, score, threshold, latency, judged), sortable
by score or frame id with buttons or the URL fragment (``#score-desc``, ``#score-asc``, ``#frame``); one
self-contained file (pictures inline as JPEG). report.png shows a few picked frames (matplotlib, colour bar),
outcomes.json every frame's numbers.

A frame's outcome is judged against the module's ground truth: FAIL on a defective module is a detection,
FAIL on a good module a false reject, PASS on a defective module a miss. Error, drop and unanswered
frames are counted apart and never as a detection.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_daemon.bench.loadgen import latency_stats

__all__ = ["FrameOutcome", "summarize", "format_summary", "pick_frames", "write_report", "latency_stats"]


@dataclass(frozen=True)
class FrameOutcome:
    frame_id: int
    defective: bool  # ground truth
    defect_cells: int
    kind: str  # verdict | error | drop | unanswered
    verdict: str | None = None  # PASS | FAIL
    score: float | None = None
    threshold: float | None = None
    latency_ms: float | None = None
    reason: str = ""
    regions: tuple = ()  # the daemon's defect regions: dicts x, y, w, h (frame pixels), area, peak, mean

    @property
    def judged(self) -> str:
        """hit | miss | false-reject | ok | the kind for frames without a verdict."""
        if self.kind != "verdict":
            return self.kind
        if self.defective:
            return "hit" if self.verdict == "FAIL" else "miss"
        return "false-reject" if self.verdict == "FAIL" else "ok"


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def summarize(outcomes: list[FrameOutcome]) -> dict:
    """Counts, detection rate, false rejects and latency percentiles of a demo run."""
    judged = [o.judged for o in outcomes]
    verdicts = [o for o in outcomes if o.kind == "verdict"]
    defective = [o for o in verdicts if o.defective]
    good = [o for o in verdicts if not o.defective]
    hits, false_rejects = judged.count("hit"), judged.count("false-reject")
    return {
        "frames": len(outcomes),
        "answered": len(verdicts),
        "pass": sum(o.verdict == "PASS" for o in verdicts),
        "fail": sum(o.verdict == "FAIL" for o in verdicts),
        "errors": judged.count("error"),
        "drops": judged.count("drop"),
        "unanswered": judged.count("unanswered"),
        "defective_modules": len(defective),
        "detected": hits,
        "detection_rate": _rate(hits, len(defective)),
        "good_modules": len(good),
        "false_rejects": false_rejects,
        "false_reject_rate": _rate(false_rejects, len(good)),
        "latency_ms": latency_stats(o.latency_ms for o in verdicts),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_summary(s: dict) -> str:
    lat = s["latency_ms"]
    return "\n".join([
        f"frames {s['frames']}: answered {s['answered']} (PASS {s['pass']}, FAIL {s['fail']}), "
        f"errors {s['errors']}, drops {s['drops']}, unanswered {s['unanswered']}",
        f"defective modules {s['defective_modules']}: detected {s['detected']} "
        f"(detection rate {_pct(s['detection_rate'])})",
        f"good modules {s['good_modules']}: false rejects {s['false_rejects']} "
        f"({_pct(s['false_reject_rate'])})",
        f"latency ms (capture -> verdict received): p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  "
        f"p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}",
    ])


def pick_frames(outcomes: list[FrameOutcome], available: set[int], count: int = 4) -> list[FrameOutcome]:
    """Frames worth showing: the best-scoring hit, misses and false rejects, then a good module."""
    have = [o for o in outcomes if o.kind == "verdict" and o.frame_id in available]
    order = {"miss": 0, "false-reject": 1, "hit": 2, "ok": 3}
    by_kind: dict[str, list[FrameOutcome]] = {}
    for o in sorted(have, key=lambda o: -(o.score or 0.0)):
        by_kind.setdefault(o.judged, []).append(o)
    picks: list[FrameOutcome] = []
    for kind in ("hit", "miss", "false-reject", "ok"):  # one of each kind first
        if by_kind.get(kind):
            picks.append(by_kind[kind].pop(0))
    rest = sorted((o for v in by_kind.values() for o in v), key=lambda o: order[o.judged])
    return (picks + rest)[:count]


def _panel(ax_img, ax_map, image, amap, outcome, boxes, defects, vmax):
    import cv2

    h, w = image.shape
    heat = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    ax_img.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax_map.imshow(image, cmap="gray", vmin=0, vmax=255)
    shown = ax_map.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
    bar = ax_map.figure.colorbar(shown, ax=ax_map, fraction=0.035, pad=0.02)
    bar.solids.set_alpha(1.0)
    bar.ax.axhline(outcome.threshold, color="black", linewidth=1.5)
    bar.ax.tick_params(labelsize=6)
    for (x, y, bw, bh), bad in zip(boxes, defects.flat, strict=True):
        if bad:
            for ax in (ax_img, ax_map):
                ax.add_patch(_rect(x, y, bw, bh))
    title = (f"frame {outcome.frame_id}: {outcome.verdict} score {outcome.score:.3f} "
             f"(thr {outcome.threshold:.3f}, black line) - {outcome.judged}")
    ax_img.set_title(f"truth: {outcome.defect_cells} defective cell(s) (red)", fontsize=8)
    ax_map.set_title(title, fontsize=8)
    for ax in (ax_img, ax_map):
        ax.axis("off")


def _rect(x, y, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=1.5)


def write_png(path: Path, picks: list[FrameOutcome], images: dict, maps: dict, defects: dict, boxes,
              title: str) -> Path:
    """One row per picked frame: the module with defective cells outlined, and the fused heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(picks))
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.2 * rows), squeeze=False)
    for row, o in zip(axes, picks, strict=False):
        vmax = 2.0 * (o.threshold or 1.0)
        _panel(row[0], row[1], images[o.frame_id], maps[o.frame_id], o, boxes, defects[o.frame_id], vmax)
    for row in axes[len(picks):]:
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(out_dir: Path, outcomes: list[FrameOutcome], summary: dict, images: dict, maps: dict,
                 defects: dict, boxes, meta: dict, count: int = 4) -> dict[str, Path]:
    """report.html (every frame), report.png (a few), outcomes.json. ``images``/``maps``/``defects`` are
    keyed by frame id; ``boxes`` are the cells' (x, y, w, h), row-major like each ``defects`` array."""
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = pick_frames(outcomes, set(maps) & set(images), count)
    png = write_png(out_dir / "report.png", picks, images, maps, defects, boxes,
                    f"edge-inspect demo - {meta.get('model', '')}")
    data = {"summary": summary, "meta": meta, "frames": [asdict(o) | {"judged": o.judged} for o in outcomes]}
    (out_dir / "outcomes.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    cards = "\n".join(_card(o, images.get(o.frame_id), maps.get(o.frame_id), defects.get(o.frame_id), boxes)
                      for o in outcomes)
    page = out_dir / "report.html"
    page.write_text(_html(summary, meta, cards, len(outcomes), base64.b64encode(png.read_bytes()).decode()))
    return {"png": png, "html": page, "json": out_dir / "outcomes.json"}


THUMB_WIDTH = 400  # pixels of the frame in a card (the colour bar comes beside it)


def _data_uri(rgb: np.ndarray) -> str:
    from .overlay import encode_image

    return "data:image/jpeg;base64," + base64.b64encode(encode_image(rgb, ".jpg", 85)).decode()


def _card(o: FrameOutcome, image, amap, defects, boxes) -> str:
    """One frame: the module (regions red, defective cells green), the heat map with its colour bar."""
    from .overlay import inspection_picture

    truth = [] if defects is None else [b for b, bad in zip(boxes, defects.flat, strict=True) if bad]
    pictures = []
    if image is not None:
        pictures.append(("module, regions (red), defective cells (green)",
                         inspection_picture(image, None, o.regions, truth_boxes=truth, width=THUMB_WIDTH)))
        if amap is not None and o.threshold:
            pictures.append(("fused heat map, colour bar 0 to 2 x threshold",
                             inspection_picture(image, amap, o.regions, 2.0 * o.threshold, o.threshold,
                                                width=THUMB_WIDTH)))
    imgs = "".join(f"<img alt='{html.escape(alt)}' title='{html.escape(alt)}' src='{_data_uri(rgb)}'>"
                   for alt, rgb in pictures)
    score = "" if o.score is None else f"{o.score:.4f}"
    thr = "" if o.threshold is None else f"{o.threshold:.4f}"
    reason = f"<br>{html.escape(o.reason)}" if o.reason and o.kind != "verdict" else ""
    caption = (f"<b>frame {o.frame_id}</b> &middot; <b class='v'>{o.verdict or o.kind}</b> &middot; score "
               f"{score or '-'} (threshold {thr or '-'}) &middot; {o.judged} &middot; truth: "
               f"{o.defect_cells} defective cell(s) &middot; {len(o.regions)} region(s) &middot; "
               f"{_ms(o.latency_ms)} ms{reason}")
    sort_score = -1.0 if o.score is None else o.score
    return (f"<figure class='card {o.judged}' data-frame='{o.frame_id}' data-score='{sort_score:.6f}'>"
            f"{imgs}<figcaption>{caption}</figcaption></figure>")


SCRIPT = """
function sortCards(mode) {
  const box = document.getElementById('cards');
  const cards = Array.from(box.querySelectorAll('.card'));
  const key = mode === 'frame' ? (c => +c.dataset.frame) : (c => +c.dataset.score);
  const sign = mode === 'score-desc' ? -1 : 1;
  cards.sort((a, b) => sign * (key(a) - key(b)) || (+a.dataset.frame - +b.dataset.frame));
  cards.forEach(c => box.appendChild(c));
  document.body.dataset.sort = mode;
  document.getElementById('shown').textContent = cards.length + ' frames, sorted by ' +
    {'score-desc': 'score, highest first', 'score-asc': 'score, lowest first', 'frame': 'frame id'}[mode];
}
document.querySelectorAll('button[data-sort]').forEach(b => b.onclick = () => {
  history.replaceState(null, '', '#' + b.dataset.sort); sortCards(b.dataset.sort); });
const wanted = location.hash.slice(1);
sortCards(['score-desc', 'score-asc', 'frame'].includes(wanted) ? wanted : 'score-desc');
"""

STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
#cards{display:flex;flex-wrap:wrap;gap:12px}
.card{margin:0;padding:6px;border:2px solid #ccc;border-radius:6px;max-width:920px}
.card img{margin-right:6px;vertical-align:top}
.card figcaption{font-size:13px;margin-top:4px}.miss,.false-reject{border-color:#d33;background:#fee}
.hit{border-color:#3a3;background:#efe}.ok{border-color:#9c9}.drop,.error,.unanswered{border-color:#c90}
button{margin-right:6px}"""


def _html(summary: dict, meta: dict, cards: str, n_frames: int, png_b64: str) -> str:
    meta_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in meta.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edge-inspect demo</title>
<style>{STYLE}</style></head><body><h1>edge-inspect demo</h1>
<pre>{html.escape(format_summary(summary))}</pre>
<table>{meta_rows}</table>
<h2>Frames ({n_frames})</h2>
<p>Sort: <button data-sort="score-desc">score, highest first</button><button data-sort="score-asc">score,
lowest first</button><button data-sort="frame">frame id</button> <span id="shown"></span></p>
<div id="cards">
{cards}
</div>
<h2>A few frames (report.png)</h2><img alt="picked frames" src="data:image/png;base64,{png_b64}">
<script>{SCRIPT}</script></body></html>
"""
