"""Calibration report (PNG): score histograms of good and defective images with the threshold, and the
expected false-reject and miss rates with their 95 % confidence bounds (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_calibration_report"]


def _rate_line(name: str, rate) -> str:
    if rate is None:
        return f"{name}: no images"
    value, low, high = rate
    return f"{name} {value:.3f}  (95 % {low:.3f} - {high:.3f})"


def write_calibration_report(path: str | Path, good_scores, defective_scores, calibration,
                             title: str = "") -> Path:
    """Histograms (good, defective) on one axis with the image threshold; the rates and how the threshold was
    estimated written beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = np.asarray(good_scores, dtype=np.float64)
    bad = None if defective_scores is None else np.asarray(defective_scores, dtype=np.float64)
    threshold = calibration.thresholds.image
    values = good if bad is None or not bad.size else np.concatenate([good, bad])
    edges = np.linspace(min(values.min(), threshold), max(values.max(), threshold), 41)
    fig, (ax, text) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax.hist(good, bins=edges, alpha=0.6, color="tab:green", label=f"good ({good.size})")
    if bad is not None and bad.size:
        ax.hist(bad, bins=edges, alpha=0.6, color="tab:red", label=f"defective ({bad.size})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (the daemon's)", ylabel="images", title=title or "calibration")
    ax.legend(fontsize=8)
    est = calibration.image
    lines = [f"target false-reject rate {est.target_frr:g}",
             f"estimator: {est.estimator} on {est.n} good images",
             f"empirical quantile {est.empirical:.4g}"
             + ("" if est.tail is None else f", tail fit {est.tail:.4g}"),
             _rate_line("false reject (these good)", calibration.observed_frr),
             _rate_line("miss (these defective)", calibration.observed_miss),
             f"region threshold {calibration.thresholds.pixel:.4g}"]
    if est.warning:
        lines.append("")
        lines.append("WARNING: too few good images to resolve the target rate")
    text.axis("off")
    text.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8, wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
