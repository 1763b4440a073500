"""Pictures of a training run with Pillow alone: training curves and line images.

No matplotlib: the curves are a few hundred lines of pixels, and Pillow is
already a dependency. Everything returns PNG bytes, ready to embed in a
markdown artifact as a ``data:`` URI (``data_uri``).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Points = Sequence[tuple[float, float]]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def line_png(image: np.ndarray, scale: int = 1) -> bytes:
    """A line image (255 ink) as a PNG with dark ink on white paper."""
    picture = Image.fromarray(255 - np.asarray(image, np.uint8))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 2)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def chart(
    series: dict[str, Points],
    title: str,
    x_label: str = "step",
    size: tuple[int, int] = (560, 360),
) -> Image.Image:
    """One panel: each named series as a polyline, with axes, ticks and a legend."""
    width, height = size
    left, right, top, bottom = 64, 16, 34, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill="black", font=font)
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((left, height // 2), "no data yet", fill="gray", font=font)
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = _nice_ticks(min(xs), max(xs))
    y_ticks = _nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0 or 1) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0 or 1) * (height - top - bottom)
        return px, py

    # Axes, grid and tick labels.
    for y in y_ticks:
        _, py = at(x0, y)
        draw.line([(left, py), (width - right, py)], fill="#e6e6e6")
        draw.text((4, py - 6), _label(y), fill="black", font=font)
    for x in x_ticks:
        px, _ = at(x, y0)
        draw.line([(px, top), (px, height - bottom)], fill="#f0f0f0")
        draw.text((px - 10, height - bottom + 6), _label(x), fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 12, height - 18), x_label, fill="black", font=font)

    # Series and legend.
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        line = [at(x, y) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for px, py in line if len(line) < 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((width - right - 150, top + 6 + 14 * i), name, fill=color, font=font)
    return image


def training_curves_png(
    losses: Points, val_cer: Points, val_wer: Points | None = None
) -> bytes:
    """Two panels side by side: training loss, and validation CER (and WER)."""
    left = chart({"train loss (CTC, per line)": losses}, "training loss")
    errors = {"val CER": val_cer}
    if val_wer:
        errors["val WER"] = val_wer
    right = chart(errors, "validation error rates")
    image = Image.new("RGB", (left.width + right.width, left.height), "white")
    image.paste(left, (0, 0))
    image.paste(right, (left.width, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
