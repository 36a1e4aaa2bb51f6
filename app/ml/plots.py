"""PNG output without a plotting library: sample grids and loss curves drawn with Pillow."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from app.core.images import image_grid

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values spanning [low, high]."""
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def loss_plot(history: dict[str, list[float]], title: str, size: tuple[int, int] = (720, 400)) -> bytes:
    """Line plot of each named series against the epoch, with labelled axes, ticks and a legend, as PNG bytes."""
    width, height = size
    left, right, top, bottom = 64, 160, 28, 44
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    values = [v for series in history.values() for v in series if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    epochs = max((len(s) for s in history.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * (i / max(epochs - 1, 1)), top + plot_h * (1 - (v - low) / (high - low))

    draw.text((left, 8), title, fill="black")
    for value in _ticks(low, high):
        y = point(0, value)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    for epoch in _ticks(1, max(epochs, 2), 8):
        if epoch == int(epoch) and epoch <= epochs:
            x = point(int(epoch) - 1, low)[0]
            draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
            draw.text((x - 6, top + plot_h + 6), str(int(epoch)), fill="black")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w // 2 - 16, height - 16), "epoch", fill="black")
    draw.text((4, top - 18), "loss", fill="black")
    for k, (name, series) in enumerate(history.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        points = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        legend_y = top + 4 + 14 * k
        draw.line([(left + plot_w + 10, legend_y + 6), (left + plot_w + 26, legend_y + 6)], fill=colour, width=2)
        draw.text((left + plot_w + 30, legend_y), name, fill="black")
    return _png(canvas)


def labelled_grid(images: np.ndarray, row_names: list[str], scale: int = 1, padding: int = 2) -> bytes:
    """uint8 `[N, H, W, C]` samples, `N / len(row_names)` per row in row order, with each row's name on its left,
    as PNG bytes."""
    rows = len(row_names)
    grid = image_grid(images, columns=len(images) // rows, padding=padding, scale=scale)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    label_width = 8 + 7 * max((len(name) for name in row_names), default=0)
    canvas = Image.new("RGB", (label_width + image.width, image.height), "white")
    canvas.paste(image.convert("RGB"), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = image.height / rows
    for r, name in enumerate(row_names):
        draw.text((4, int(r * row_height + row_height / 2 - 6)), name, fill="black")
    return _png(canvas)


def _png(canvas: Image.Image) -> bytes:
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
