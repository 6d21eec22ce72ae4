"""Inline SVG charts for the dashboard: no script, no network, readable without a browser's help.

    line_chart({"train loss": [(1, 2.3), (2, 1.9)]}, {"train loss": "#1565c0"})
    bar_chart([RoundBar(round=1, admitted=3, rejected=1, reasons={"late": 1})])

Charts scale to their container (viewBox, width 100%), so they stay readable on a phone; every
point and bar carries a <title> that a pointer shows on hover.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoundBar:
    """One round's stacked bar: admitted and rejected updates."""

    round: int
    admitted: int
    rejected: int
    reasons: Mapping[str, int] = field(default_factory=dict)  # reason code -> rejected updates

    def rejected_title(self) -> str:
        detail = ", ".join(f"{code} {n}" for code, n in sorted(self.reasons.items()))
        return f"round {self.round}: {self.rejected} rejected" + (f" ({detail})" if detail else "")


def _svg_open(chart_id: str, width: int, height: int, label: str) -> str:
    return (f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="100%" '
            f'style="max-width:{width}px" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(label)}">')


def line_chart(series: dict[str, list[tuple[int, float]]], colors: dict[str, str],
               width: int = 640, height: int = 260, dashed: frozenset[str] = frozenset(),
               chart_id: str = "loss-chart") -> str:
    """An inline SVG line chart, one polyline per series (those in `dashed` drawn thin and dashed)."""
    pad_l, pad_r, pad_t, pad_b = 52, 16, 34, 32
    points = [p for values in series.values() for p in values]
    if not points:
        return _svg_open(chart_id, width, height, "loss per round") + \
            '<text x="20" y="40">no aggregated round yet</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda y: pad_t + (y1 - y) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    parts = [_svg_open(chart_id, width, height, "loss per round"),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     f'stroke="#e5e5e5"/><text x="{pad_l - 6}" y="{sy(y) + 4:.1f}" font-size="13" '
                     f'text-anchor="end">{y:.3g}</text>')
    for x in sorted(set(xs)) if len(set(xs)) <= 20 else range(x0, x1 + 1, max(1, (x1 - x0) // 10)):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - 12}" font-size="13" '
                     f'text-anchor="middle">{x}</text>')
    legend_x = pad_l
    for name, values in series.items():
        if not values:
            continue
        color, label = colors[name], html.escape(name)
        stroke = 'stroke-width="1.5" stroke-dasharray="5 4"' if name in dashed else 'stroke-width="3"'
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" {stroke} points="{coords}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{3 if name in dashed else 4}" '
                  f'fill="{color}" data-series="{label}" data-round="{x}" data-value="{y:.6g}">'
                  f"<title>{label}, round {x}: {y:.4g}</title></circle>" for x, y in values]
        parts.append(f'<text x="{legend_x}" y="16" font-size="14" fill="{color}">&#9632; {label}</text>')
        legend_x += 24 + 8 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(rounds: list[RoundBar], width: int = 640, height: int = 200) -> str:
    """Admitted (green) and rejected (red) updates per round, stacked."""
    pad_l, pad_b, pad_t = 40, 28, 12
    if not rounds:
        return _svg_open("participation-chart", width, height, "updates per round") + \
            '<text x="20" y="40">no round yet</text></svg>'
    top = max(1, max(r.admitted + r.rejected for r in rounds))
    step = (width - pad_l - 8) / len(rounds)
    bar = max(2.0, step * 0.7)
    scale = (height - pad_b - pad_t) / top
    parts = [_svg_open("participation-chart", width, height, "updates per round"),
             f'<text x="{pad_l - 6}" y="{pad_t + 4}" font-size="13" text-anchor="end">{top}</text>',
             f'<text x="{pad_l - 6}" y="{height - pad_b}" font-size="13" text-anchor="end">0</text>']
    for i, r in enumerate(rounds):
        x = pad_l + i * step
        base: float = height - pad_b
        for count, color, title in ((r.admitted, "#2e7d32", f"round {r.round}: {r.admitted} admitted"),
                                    (r.rejected, "#c62828", r.rejected_title())):
            if count:
                parts.append(f'<rect x="{x:.1f}" y="{base - count * scale:.1f}" width="{bar:.1f}" '
                             f'height="{count * scale:.1f}" fill="{color}"><title>{html.escape(title)}'
                             f'</title></rect>')
                base -= count * scale
        if len(rounds) <= 30 or i % math.ceil(len(rounds) / 15) == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{height - 10}" font-size="13" '
                         f'text-anchor="middle">{r.round}</text>')
    parts.append("</svg>")
    return "".join(parts)
