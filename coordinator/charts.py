"""Inline SVG charts for the dashboard: no script, no network, readable without a browser's help.

    line_chart({"train loss": [(1, 2.3), (2, 1.9)]}, {"train loss": "#1565c0"})
    bar_chart([RoundBar(round=1, admitted=3, rejected=1)])
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundBar:
    """One round's stacked bar: admitted and rejected updates."""

    round: int
    admitted: int
    rejected: int


def line_chart(series: dict[str, list[tuple[int, float]]], colors: dict[str, str],
                width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart; no script, no network."""
    pad_l, pad_r, pad_t, pad_b = 52, 16, 16, 32
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<svg id="loss-chart" width="{width}" height="{height}" role="img"><text x="20" y="40">' \
               "no aggregated round yet</text></svg>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda y: pad_t + (y1 - y) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    parts = [f'<svg id="loss-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="loss per round">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     f'stroke="#e5e5e5"/><text x="{pad_l - 6}" y="{sy(y) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{y:.3g}</text>')
    for x in sorted(set(xs)) if len(set(xs)) <= 20 else range(x0, x1 + 1, max(1, (x1 - x0) // 10)):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - 12}" font-size="11" '
                     f'text-anchor="middle">{x}</text>')
    for i, (name, values) in enumerate(series.items()):
        if not values:
            continue
        color = colors[name]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in values]
        parts.append(f'<text x="{pad_l + 10 + 110 * i}" y="{pad_t + 12}" font-size="12" fill="{color}">'
                     f"&#9632; {html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(rounds: list[RoundBar], width: int = 640, height: int = 200) -> str:
    """Admitted (green) and rejected (red) updates per round, stacked."""
    pad_l, pad_b, pad_t = 40, 28, 12
    if not rounds:
        return f'<svg id="participation-chart" width="{width}" height="{height}"><text x="20" y="40">' \
               "no round yet</text></svg>"
    top = max(1, max(r.admitted + r.rejected for r in rounds))
    step = (width - pad_l - 8) / len(rounds)
    bar = max(2.0, step * 0.7)
    scale = (height - pad_b - pad_t) / top
    parts = [f'<svg id="participation-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="updates per round">',
             f'<text x="{pad_l - 6}" y="{pad_t + 4}" font-size="11" text-anchor="end">{top}</text>',
             f'<text x="{pad_l - 6}" y="{height - pad_b}" font-size="11" text-anchor="end">0</text>']
    for i, r in enumerate(rounds):
        x = pad_l + i * step
        base: float = height - pad_b
        for count, color in ((r.admitted, "#2e7d32"), (r.rejected, "#c62828")):
            if count:
                parts.append(f'<rect x="{x:.1f}" y="{base - count * scale:.1f}" width="{bar:.1f}" '
                             f'height="{count * scale:.1f}" fill="{color}"><title>round {r.round}: '
                             f'{count}</title></rect>')
                base -= count * scale
        if len(rounds) <= 30 or i % math.ceil(len(rounds) / 15) == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{height - 10}" font-size="11" '
                         f'text-anchor="middle">{r.round}</text>')
    parts.append("</svg>")
    return "".join(parts)
