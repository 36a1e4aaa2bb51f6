"""A model's card as one self-contained HTML page: headline figures, the TSTR protocol, per-class bars, privacy and
calibration, a sample grid and the nearest-training-neighbour grid. Every value is escaped; images are inlined."""

from __future__ import annotations

import base64
import html
from typing import Any

from app.api.page_security import CARD_CSP

STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border-bottom:1px solid #ddd;padding:.25rem .6rem;
text-align:left}th{background:#f4f4f4}.bar{display:inline-block;height:.7rem;background:#4a7bd0;margin-right:.4rem}
img{image-rendering:pixelated;max-width:100%}.note{color:#666;font-size:.9rem}"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4f}" + (f" ± {value['std']:.4f}" if "std" in value else "")
    return html.escape(str(value))


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in rows.items()
                   if not isinstance(v, (dict, list)) or (isinstance(v, dict) and "mean" in v))
    return f"<table>{body}</table>"


def _bar(value: float | None) -> str:
    if value is None:
        return "–"
    return f'<span class="bar" style="width:{max(0.0, min(1.0, value)) * 8:.2f}rem"></span>{value:.3f}'


def _per_class(per_class: dict[str, dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{_bar(f.get('tstr_recall'))}</td>"
                   f"<td>{_bar(f.get('label_agreement'))}</td><td>{_cell(f.get('frechet_distance'))}</td></tr>"
                   for name, f in per_class.items())
    return ("<table><tr><th>class</th><th>TSTR recall</th><th>label agreement</th><th>Fréchet distance</th></tr>"
            f"{rows}</table>")


def _sampling(sampling: dict[str, Any]) -> str:
    """The latent-scale sweep: validation TSTR and label agreement per scale (as drawn, and filtered), and the
    choice."""
    agreement = sampling.get("label_agreement", {})
    rows = "".join(f"<tr><td>{html.escape(str(scale))}</td><td>{_cell(figure)}</td>"
                   f"<td>{_cell(agreement.get(scale, '–'))}</td></tr>"
                   for scale, figure in sampling.get("validation_tstr", {}).items())
    note = f"chosen: {_cell(sampling.get('latent_scale'))}"
    if isinstance(spec := sampling.get("label_filter"), dict):
        note += (f", through the label filter (a sample is drawn again until the evaluator gives its label at least "
                 f"{_cell(spec.get('min_confidence'))})")
    if "label_agreement_floor" in sampling:
        note += (f"; a scale whose label agreement is under {_cell(sampling['label_agreement_floor'])} "
                 f"({_cell(sampling.get('min_label_agreement'))} × the real validation images' "
                 f"{_cell(sampling.get('real_val_accuracy'))}) is not chosen")
    return (f"<table><tr><th>latent_scale</th><th>validation TSTR</th><th>label agreement</th></tr>{rows}</table>"
            f'<p class="note">{note}</p>')


def _image(png: bytes | None, alt: str) -> str:
    if not png:
        return f'<p class="note">no {html.escape(alt)}</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def card_page(name: str, card: dict[str, Any], samples_png: bytes | None, neighbours_png: bytes | None,
              samples_note: str | None = None) -> str:
    """The HTML report of one model's card; `samples_note` says what a bounded sample grid leaves out."""
    sections = [f"<h1>{html.escape(name)}</h1>",
                '<p class="note">synthgen model card; the JSON is at the same address without ?format=html.</p>']
    if card.get("protocol"):
        protocol = card["protocol"]
        sections += ["<h2>Protocol: a fixed CNN trained on each data, scored on real test images</h2>",
                     _table({k: v for k, v in protocol.items() if k != "protocol"}),
                     f'<p class="note">{_cell(protocol.get("protocol", {}))}</p>']
    for title, key in (("Test split", "test_metrics"), ("Metrics (validation split)", "metrics"),
                       ("Privacy", "privacy"), ("Evaluator calibration", "calibration"), ("Training", "training")):
        if card.get(key):
            sections += [f"<h2>{title}</h2>", _table(card[key])]
    if card.get("sampling"):
        sections += ["<h2>Sampling: the latent scale chosen on the validation split</h2>", _sampling(card["sampling"])]
    if card.get("per_class"):
        sections += ["<h2>Per class</h2>", _per_class(card["per_class"])]
    sections += ["<h2>Samples (seed 0, one row per class)</h2>"]
    if samples_note:
        sections.append(f'<p class="note">{html.escape(samples_note)}</p>')
    sections += [_image(samples_png, "sample grid"),
                 "<h2>Nearest training neighbours</h2>",
                 '<p class="note">Per class, the samples closest to a training image, each beside that image.</p>',
                 _image(neighbours_png, "nearest-neighbour grid")]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CARD_CSP}">'
            f"<title>{html.escape(name)} · card</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
