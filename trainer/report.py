"""PNG report: ROC curve(s) when there is a test set, and a grid of images with their anomaly maps overlaid on
one colour scale, shown by a colour bar (matplotlib, Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Panel", "pick_panels", "write_report"]


@dataclass(frozen=True)
class Panel:
    image: np.ndarray  # uint8 H x W x C
    heat: np.ndarray  # normalised map h x w (any size; stretched over the image)
    title: str
    mask: np.ndarray | None = None


def pick_panels(images, maps, scores, labels, names, masks=None, count: int = 8) -> list[Panel]:
    """The highest-scoring good images and the highest- and lowest-scoring defective ones."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    order = np.argsort(-scores)
    good = [i for i in order if labels[i] == 0][: count // 4]
    bad = [i for i in order if labels[i] == 1]
    chosen = good + bad[: count // 2] + bad[::-1][: count - count // 2 - len(good)]
    seen, panels = set(), []
    for i in chosen:
        if i in seen:
            continue
        seen.add(i)
        tag = "defect" if labels[i] else "good"
        panels.append(Panel(images[i], maps[i], f"{names[i]} ({tag}) {scores[i]:.3f}",
                            None if masks is None else masks[i]))
    return panels


def write_report(path: str | Path, rocs: dict[str, tuple[np.ndarray, np.ndarray, float]],
                 panels: list[Panel], title: str = "", vmax: float | None = None) -> Path:
    """rocs: name -> (fpr, tpr, auroc); none (no test set): no ROC panel. Heat maps share one colour scale
    from 0 to ``vmax`` (default: the largest map value), drawn as a colour bar at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    first = 1 if rocs else 0  # grid cells before the first panel
    rows = max(1, -(-(first * cols + len(panels)) // cols))
    fig = plt.figure(figsize=(4 * cols + 0.6, 4 * rows))
    if rocs:
        _roc_axes(fig.add_subplot(rows, cols, 1), rocs)
    top = max(vmax if vmax is not None else max((float(p.heat.max()) for p in panels), default=1.0), 1e-6)
    shown = None
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, first * cols + k + 1)
        h, w = panel.image.shape[:2]
        ax.imshow(panel.image.squeeze(), cmap="gray" if panel.image.shape[2] == 1 else None)
        shown = ax.imshow(panel.heat, cmap="jet", alpha=0.45, vmin=0, vmax=top, extent=(0, w, h, 0))
        if panel.mask is not None and panel.mask.any():
            ax.contour(panel.mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(panel.title, fontsize=7)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.96, 1))
    if shown is not None:
        bar = fig.colorbar(shown, cax=fig.add_axes((0.965, 0.1, 0.01, 0.8)))
        bar.solids.set_alpha(1.0)  # the scale itself, not the see-through overlay
        bar.set_label("normalised anomaly score", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _roc_axes(ax, rocs: dict) -> None:
    for name, (fpr, tpr, auc) in rocs.items():
        ax.plot(fpr, tpr, label=f"{name} AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
