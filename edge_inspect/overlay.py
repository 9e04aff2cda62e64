"""Pictures of one inspected frame (NumPy + OpenCV, no matplotlib): the frame with its defect regions drawn,
the anomaly map over it in the jet colour map, and a colour bar with the threshold marked.

Used by ``edge-inspect predict`` and the demo's HTML report, so both show a frame the same way. The colour
scale runs from 0 to ``vmax`` (2 x the image threshold unless given), so the threshold sits at the middle
of the bar and a region above it reads orange to red.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["as_rgb", "draw_boxes", "heat_overlay", "colour_bar", "inspection_picture", "thumbnail",
           "encode_image"]

RED, GREEN, WHITE, BLACK = (255, 40, 40), (40, 220, 40), (255, 255, 255), (0, 0, 0)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 H x W, H x W x 1 or H x W x 3 (uint16: the top 8 bits) -> H x W x 3 uint8 RGB."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ValueError(f"expected an H x W (x 1 or 3) image, got shape {image.shape}")


def draw_boxes(rgb: np.ndarray, boxes, colour=RED, thickness: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with (x, y, w, h) rectangles drawn (dicts with x, y, w, h keys work too)."""
    out = rgb.copy()
    thickness = thickness or max(1, round(max(rgb.shape[:2]) / 300))
    for box in boxes:
        x, y, w, h = (box["x"], box["y"], box["w"], box["h"]) if isinstance(box, dict) else box
        cv2.rectangle(out, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), colour, thickness)
    return out


def _jet(values: np.ndarray, vmax: float) -> np.ndarray:
    scaled = np.clip(values / max(vmax, 1e-12), 0.0, 1.0)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """The map (any size: stretched over the frame) in jet from 0 to vmax, blended over the frame."""
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    heat = cv2.resize(np.asarray(anomaly_map, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(rgb, 1.0 - alpha, _jet(heat, vmax), alpha, 0.0)


def _text(img: np.ndarray, text: str, x: int, y: int, scale: float, colour=BLACK) -> None:
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, max(1, round(scale * 1.5)),
                cv2.LINE_AA)


def colour_bar(height: int, vmax: float, threshold: float | None = None) -> np.ndarray:
    """A vertical colour bar (white background) from 0 (bottom) to vmax (top), five ticks labelled, the
    threshold marked with a line and ``thr``. Text stays readable on small pictures (about 9 px at least)."""
    font = max(0.4, height / 1100)  # OpenCV font scale
    unit = font / 0.4
    bar_w, margin = int(14 * unit), int(10 * unit)
    width = 4 + bar_w + 10 + int(58 * unit)
    top, bottom = margin, height - margin - int(4 * unit)
    out = np.full((height, width, 3), 255, np.uint8)
    ramp = np.linspace(vmax, 0.0, max(2, bottom - top))[:, None].repeat(bar_w, axis=1)
    out[top:bottom, 4:4 + bar_w] = _jet(ramp, vmax)

    def y_of(value: float) -> int:
        return int(round(bottom - 1 - (bottom - top - 1) * value / max(vmax, 1e-12)))

    for value in np.linspace(0.0, vmax, 5):
        y = y_of(value)
        cv2.line(out, (4 + bar_w, y), (8 + bar_w, y), BLACK, 1)
        _text(out, f"{value:.3g}", 10 + bar_w, y + int(4 * unit), font)
    if threshold is not None and 0 <= threshold <= vmax:
        y = y_of(threshold)
        cv2.line(out, (0, y), (8 + bar_w, y), BLACK, max(1, round(unit)))
        _text(out, "thr", 10 + bar_w, y - int(6 * unit), font)
    return out


def inspection_picture(image: np.ndarray, anomaly_map: np.ndarray | None, regions=(), vmax: float = 1.0,
                       threshold: float | None = None, truth_boxes=(),
                       width: int | None = None) -> np.ndarray:
    """The frame with the map overlaid (when there is one), regions in red, ground truth in green, and the
    colour bar on the right: one RGB picture, the frame part scaled down to ``width`` pixels when given."""
    rgb = as_rgb(image) if anomaly_map is None else heat_overlay(image, anomaly_map, vmax)
    rgb = draw_boxes(draw_boxes(rgb, truth_boxes, GREEN), regions, RED)
    if width is not None:
        rgb = thumbnail(rgb, width)
    if anomaly_map is None:
        return rgb
    return np.hstack([rgb, colour_bar(rgb.shape[0], vmax, threshold)])


def thumbnail(rgb: np.ndarray, width: int) -> np.ndarray:
    """Scaled to ``width`` pixels wide (never up)."""
    h, w = rgb.shape[:2]
    if w <= width:
        return rgb
    return cv2.resize(rgb, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def encode_image(rgb: np.ndarray, ext: str = ".png", quality: int = 85) -> bytes:
    """RGB uint8 -> encoded PNG or JPEG bytes."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} picture as {ext}")
    return buf.tobytes()
