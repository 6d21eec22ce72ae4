"""The dashboard page: how good the community adapter is (the federated evaluation curve, train
loss beside it), admitted and rejected updates per round with reasons, each volunteer's
contribution, the open round's progress and the latest release with its download command.

One HTML page from `static/dashboard.html` (a `string.Template`) with inline SVG charts, so
it renders without scripts or network access; it refreshes itself every 15 s. It shows the
same bodies the JSON API serves (`api_models`), so page and API never disagree.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from loracommons.coordinator.api_models import ContributionOut, OpenRoundOut, ProjectOut, RoundOut
from loracommons.coordinator.charts import RoundBar, bar_chart, line_chart
from loracommons.coordinator.rows import ReleaseRow
from loracommons.coordinator.store import Store
from loracommons.protocol.errors import Reason

PAGE = Path(__file__).parent / "static" / "dashboard.html"
EVAL, TRAIN = "held-out loss (federated)", "train loss"
LOSS_COLORS = {EVAL: "#ef6c00", TRAIN: "#1565c0"}

e = html.escape


def render_dashboard(store: Store, project: ProjectOut, base_url: str) -> str:
    """The page for `project` as the store holds it now; `base_url` goes into the download command."""
    rounds = RoundOut.all_from_store(store)
    closed = [r for r in rounds if r.status != "open"]
    losses = {EVAL: [(r.round, r.eval_loss) for r in closed if r.eval_loss is not None],
              TRAIN: [(r.round, r.train_loss) for r in closed if r.train_loss is not None]}
    bars = [RoundBar(r.round, r.admitted, r.rejected, r.rejected_by_reason) for r in rounds[-60:]]
    return Template(PAGE.read_text()).substitute(
        title=e(project.name), project_id=e(project.id), base_model=e(project.base_model),
        mode=e(project.mode or "-"), membership=e(project.membership or "-"),
        fingerprint=e(project.fingerprint or "-"),
        eval_summary=_eval_summary(losses[EVAL]),
        loss_chart=line_chart(losses, LOSS_COLORS, dashed=frozenset({TRAIN})),
        participation_chart=bar_chart(bars),
        open_round=_open_round(OpenRoundOut.from_store(store)),
        release=_release(store.latest_release(), project, base_url),
        reasons=_reasons(store.status().updates.rejected_by_reason),
        rounds="".join(_round_row(r) for r in reversed(rounds[-20:])),
        contributions="".join(_contribution_row(c) for c in map(ContributionOut.from_row,
                                                                  store.contributions(limit=50))),
    )


def _eval_summary(points: list[tuple[int, float]]) -> str:
    if not points:
        return ("<p>No federated evaluation reported yet: volunteers score the adapter they receive on "
                "their held-out data before training; until then the train loss is shown.</p>")
    (r0, first), (r1, last) = points[0], points[-1]
    trend = "" if len(points) < 2 else f" (round {r0}: {first:.4f}, {last - first:+.4f} since)"
    return (f'<p class="headline" id="eval-latest">Community adapter on the volunteers\' held-out data: '
            f"loss <b>{last:.4f}</b> at round {r1}{trend}</p>")


def _open_round(progress: OpenRoundOut | None) -> str:
    if progress is None:
        return '<p id="open-round">No round is open.</p>'
    p = progress
    done = min(100, round(100 * len({x.fingerprint for x in p.replies}) / p.sampled)) if p.sampled else 0
    rows = "".join(
        f"<tr><td><code>{e(x.fingerprint or '(unparsed)')}</code></td><td>{e(x.outcome)}</td>"
        f"<td>{_reason_codes({x.reason: 1} if x.reason else {}, show_counts=False)}</td><td>{x.examples}</td>"
        f"<td>{e(x.received)}</td></tr>" for x in p.replies)
    table = ("<div class='scroll'><table><tr><th>key</th><th>outcome</th><th>reason</th><th>examples</th>"
             f"<th>received</th></tr>{rows}</table></div>") if rows else ""
    return (f'<div id="open-round"><p>Round <b>{p.round}</b> open since {e(p.started)} '
            f"(from v{p.base_version}): "
            f"<b>{p.sampled}</b> sampled, <b>{p.replied}</b> replied ({p.admitted} admitted, "
            f"{p.rejected} rejected), <b>{p.waiting}</b> still training.</p>"
            f'<div class="bar" title="{done}% of sampled volunteers replied"><span style="width:{done}%">'
            f"</span></div>{table}</div>")


def _release(latest: ReleaseRow | None, project: ProjectOut, base_url: str) -> str:
    if latest is None:
        return "<p>No release yet.</p>"
    command = f"loracommons download {base_url} --out adapter --pin {project.fingerprint or 'FINGERPRINT'}"
    return (f"<p>Version <b>v{latest.version}</b> (round {latest.round}, {e(latest.created)})"
            f"<br>manifest <code class='wrap'>{latest.manifest_digest}</code></p><pre>{e(command)}</pre>")


def reason_doc(code: str) -> str:
    """The one-line meaning of a reason code, or "" for a code outside `protocol.errors.Reason`."""
    try:
        return Reason(code).doc
    except ValueError:
        return ""


def _reason_codes(counts: dict[str, int], show_counts: bool = True) -> str:
    """Reason codes with their meaning on hover (and their counts)."""
    show = show_counts
    return ", ".join(f'<abbr title="{e(reason_doc(code))}"><code>{e(code)}</code></abbr>'
                     + (f" {n}" if show else "") for code, n in sorted(counts.items()))


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return "<p>No update rejected.</p>"
    rows = "".join(f"<tr><td><code>{e(code)}</code></td><td>{n}</td>"
                   f"<td class='text'>{e(reason_doc(code))}</td></tr>"
                   for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    head = "<tr><th>reason</th><th>updates</th><th>meaning</th></tr>"
    return f"<div class='scroll'><table>{head}{rows}</table></div>"


def _round_row(r: RoundOut) -> str:
    return (f"<tr><td>{r.round}</td><td>{e(r.status)}</td><td>{_cell(r.eval_loss)}</td>"
            f"<td>{_cell(r.train_loss)}</td><td>{r.admitted}</td><td>{r.rejected}</td>"
            f"<td>{_reason_codes(r.rejected_by_reason)}</td><td class='text'>{e(r.note or '')}</td></tr>")


def _contribution_row(c: ContributionOut) -> str:
    return (f'<tr data-fingerprint="{e(c.fingerprint)}"><td><code>{e(c.fingerprint)}</code></td>'
            f"<td>{e(c.display_name or '')}</td><td>{c.admitted}</td><td>{c.examples}</td>"
            f"<td>{c.rejected}</td><td>{_reason_codes(c.rejected_by_reason)}</td><td>{e(c.last_seen)}</td>"
            f"<td>{_cell(c.mean_staleness, 2)}</td><td>{_cell(c.updates_per_hour, 1)}</td></tr>")


def _cell(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"
