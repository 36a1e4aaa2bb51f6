"""PNG output without a plotting library: sample grids and loss curves drawn with Pillow."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def loss_plot(history: dict[str, list[float]], title: str, size: tuple[int, int] = (640, 360)) -> bytes:
    """Line plot of each named series against the epoch, as PNG bytes."""
    width, height = size
    margin = 48
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    values = [v for series in history.values() for v in series if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    epochs = max((len(s) for s in history.values()), default=1)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    draw.text((margin, 4), title, fill="black")
    draw.text((4, margin // 2), f"{high:.3g}", fill="black")
    draw.text((4, height - margin - 10), f"{low:.3g}", fill="black")
    draw.text((width // 2, height - margin + 8), f"epoch (1..{epochs})", fill="black")

    def point(i: int, v: float) -> tuple[float, float]:
        x = margin + (width - 1.5 * margin) * (i / max(epochs - 1, 1))
        y = height - margin - (height - 1.5 * margin) * (v - low) / (high - low)
        return x, y

    for k, (name, series) in enumerate(history.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        points = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((width - margin * 3, margin // 2 + 4 + 12 * k), name, fill=colour)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
