"""The dashboard page: project facts, loss and participation charts, the latest release with
its download command, rejections by reason, volunteers and rounds.

One HTML page from `static/dashboard.html` (a `string.Template`) with inline SVG charts, so
it renders without scripts or network access; it refreshes itself every 15 s.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from loracommons.coordinator.api_models import ProjectOut
from loracommons.coordinator.charts import RoundBar, bar_chart, line_chart
from loracommons.coordinator.rows import ReleaseRow, RoundRow, VolunteerRow
from loracommons.coordinator.store import Store
from loracommons.protocol.errors import Reason

PAGE = Path(__file__).parent / "static" / "dashboard.html"
LOSS_COLORS = {"train loss": "#1565c0", "eval loss": "#ef6c00"}

e = html.escape


def render_dashboard(store: Store, project: ProjectOut, base_url: str) -> str:
    """The page for `project` as the store holds it now; `base_url` goes into the download command."""
    rounds = store.rounds()
    closed = [r for r in rounds if r.status != "open"]
    losses = {"train loss": [(r.round, r.train_loss) for r in closed if r.train_loss is not None],
              "eval loss": [(r.round, r.eval_loss) for r in closed if r.eval_loss is not None]}
    bars = [RoundBar(r.round, r.admitted, r.rejected) for r in rounds[-60:]]
    return Template(PAGE.read_text()).substitute(
        title=e(project.name), project_id=e(project.id), base_model=e(project.base_model),
        mode=e(project.mode or "-"), membership=e(project.membership or "-"),
        fingerprint=e(project.fingerprint or "-"),
        loss_chart=line_chart(losses, LOSS_COLORS), participation_chart=bar_chart(bars),
        release=_release(store.latest_release(), project, base_url),
        reasons=_reasons(store.status().updates.rejected_by_reason),
        rounds="".join(_round_row(r) for r in reversed(rounds[-20:])),
        leaderboard="".join(_volunteer_row(v) for v in store.leaderboard(limit=20)),
    )


def _release(latest: ReleaseRow | None, project: ProjectOut, base_url: str) -> str:
    if latest is None:
        return "<p>No release yet.</p>"
    command = f"loracommons download {base_url} --out adapter --pin {project.fingerprint or 'FINGERPRINT'}"
    return (f"<p>Version <b>v{latest.version}</b> (round {latest.round}, {e(latest.created)})"
            f"<br>manifest <code>{latest.manifest_digest}</code></p><pre>{e(command)}</pre>")


def reason_doc(code: str) -> str:
    """The one-line meaning of a reason code, or "" for a code outside `protocol.errors.Reason`."""
    try:
        return Reason(code).doc
    except ValueError:
        return ""


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return "<p>No update rejected.</p>"
    rows = "".join(f"<tr><td><code>{e(code)}</code></td><td>{n}</td><td>{e(reason_doc(code))}</td></tr>"
                   for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"<table><tr><th>reason</th><th>updates</th><th>meaning</th></tr>{rows}</table>"


def _round_row(r: RoundRow) -> str:
    return (f"<tr><td>{r.round}</td><td>{e(r.status)}</td><td>{r.admitted}</td><td>{r.rejected}</td>"
            f"<td>{_cell(r.train_loss)}</td><td>{_cell(r.eval_loss)}</td><td>{e(r.note or '')}</td></tr>")


def _volunteer_row(v: VolunteerRow) -> str:
    return (f"<tr><td><code>{v.short}</code></td><td>{e(v.display_name or '')}</td>"
            f"<td>{v.rounds_contributed}</td><td>{v.examples_contributed}</td></tr>")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
