"""The coordinator's public, read-only HTTP API and dashboard (FastAPI).

    app = create_app("myproject", store, info={"id": ..., "name": ..., "base_model": ...,
                                              "mode": "ffa", "membership": "open",
                                              "public_key": key.public.openssh})
    uvicorn.run(app, host="0.0.0.0", port=8080)

Endpoints: /api/project, /api/releases, /api/releases/latest, /api/releases/{version},
/api/releases/{version}/files/{name} (HTTP range requests), /api/rounds, /api/volunteers,
/metrics (Prometheus text), /healthz, and / (dashboard). Nothing here writes state;
administration happens through the CLI on the coordinator machine.
"""

from __future__ import annotations

import html
import logging
import math
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from string import Template
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from loracommons.coordinator.releases import read_release, release_dir
from loracommons.coordinator.rows import ReleaseRow, RoundRow
from loracommons.coordinator.store import Store
from loracommons.protocol.canonical import parse_json
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey
from loracommons.protocol.release import MANIFEST_FILE, ReleaseManifest, check_file_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_VERSION = 2**31 - 1
_STATIC = Path(__file__).parent / "static"
RELEASE_PUBLIC_KEY = Path("keys") / "release_key.pub"  # written by `coordinator init`
_MEDIA = {".json": "application/json", ".md": "text/markdown; charset=utf-8",
          ".safetensors": "application/octet-stream"}


class ProjectOut(BaseModel):
    id: str
    name: str
    base_model: str
    base_model_revision: str = ""
    mode: str | None = None
    membership: str | None = None
    public_key: str | None = None
    fingerprint: str | None = None
    fleet_address: str | None = None
    latest_version: int | None = None


class ReleaseOut(BaseModel):
    version: int
    round: int
    created: str
    manifest_digest: str
    metrics: dict[str, Any]


class ReleaseDocument(BaseModel):
    """`release.json`: the canonical manifest text and its base64 Ed25519 signature."""

    manifest: str
    signature: str


class RoundOut(BaseModel):
    round: int
    status: str
    started: str
    closed: str | None
    base_version: int
    sampled: int
    admitted: int
    rejected: int
    train_loss: float | None
    eval_loss: float | None
    note: str


class VolunteerOut(BaseModel):
    fingerprint: str  # short display form of the key's fingerprint
    display_name: str | None
    rounds_contributed: int
    examples_contributed: int


class Health(BaseModel):
    status: str


class _RangeNotSatisfiable(Exception):
    pass


_NOT_FOUND = {404: {"description": "No such release or file"}}
_BINARY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def create_app(project_dir: str | Path, store: Store, info: Mapping | None = None) -> FastAPI:
    """Build the app. `info` (id, name, base_model, base_model_revision, mode, membership,
    public_key, fleet_address) is read on every request, so the caller may fill in keys
    later (e.g. the fleet address once the SuperLink listens); missing keys fall back to
    `project.toml` and to the latest release."""
    project_dir = Path(project_dir)
    app = FastAPI(title="LoRA Commons coordinator", version="1",
                  description="Read-only public API of a LoRA Commons coordinator.")
    manifests: dict[str, ReleaseManifest] = {}

    def manifest_of(row: ReleaseRow) -> ReleaseManifest:
        digest = row.manifest_digest
        if digest not in manifests:
            signed = read_release(project_dir, row.version)
            manifests[digest] = ReleaseManifest.from_dict(
                parse_json(signed.manifest, max_bytes=1 << 20, what="release manifest"))
        return manifests[digest]

    def release_row(version: int) -> ReleaseRow:
        row = store.release(version)
        if row is None:
            raise HTTPException(404, f"no release v{version}")
        return row

    def project_info() -> ProjectOut:
        return ProjectOut(**_project_info(project_dir, store, info, manifest_of))

    @app.get("/api/project", response_model=ProjectOut)
    def get_project() -> ProjectOut:
        return project_info()

    @app.get("/api/releases", response_model=list[ReleaseOut])
    def list_releases() -> list[ReleaseOut]:
        return [ReleaseOut(version=r.version, round=r.round, created=r.created,
                           manifest_digest=r.manifest_digest, metrics=manifest_of(r).metrics)
                for r in store.releases()]

    def document(row: ReleaseRow) -> Response:
        path = release_dir(project_dir, row.version) / MANIFEST_FILE
        return Response(path.read_bytes(), media_type="application/json",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/api/releases/latest", response_model=ReleaseDocument, responses=_NOT_FOUND)
    def latest_release() -> Response:
        row = store.latest_release()
        if row is None:
            raise HTTPException(404, "no release yet")
        return document(row)

    @app.get("/api/releases/{version}", response_model=ReleaseDocument, responses=_NOT_FOUND)
    def get_release(version: int = PathParam(ge=1, le=MAX_VERSION)) -> Response:
        return document(release_row(version))

    @app.get(
        "/api/releases/{version}/files/{name}",
        response_class=Response,
        responses={200: _BINARY, 206: {"description": "Partial content", **_BINARY},
                   416: {"description": "Range not satisfiable"}, **_NOT_FOUND},
    )
    def get_file(request: Request, version: int = PathParam(ge=1, le=MAX_VERSION),
                 name: str = PathParam(max_length=256)) -> Response:
        row = release_row(version)
        try:
            check_file_name(name)
        except ProtocolError:
            raise HTTPException(404, "no such file in this release") from None
        files = manifest_of(row).files
        folder = release_dir(project_dir, version).resolve()
        path = (folder / name).resolve()
        if name not in files or path.parent != folder or not path.is_file():
            raise HTTPException(404, "no such file in this release")
        size = path.stat().st_size
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{files[name]["sha256"]}"'}
        media = _MEDIA.get(Path(name).suffix, "application/octet-stream")
        try:
            span = parse_range(request.headers.get("range"), size)
        except _RangeNotSatisfiable:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if span is None:
            return StreamingResponse(_read(path, 0, size), media_type=media,
                                     headers={**headers, "Content-Length": str(size)})
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(_read(path, start, end), status_code=206, media_type=media, headers=headers)

    @app.get("/api/rounds", response_model=list[RoundOut])
    def list_rounds() -> list[RoundOut]:
        return [RoundOut(**{k: getattr(r, k) for k in RoundOut.model_fields}) for r in store.rounds()]

    @app.get("/api/volunteers", response_model=list[VolunteerOut])
    def list_volunteers() -> list[VolunteerOut]:
        return [VolunteerOut(fingerprint=v.short, display_name=v.display_name,
                             rounds_contributed=v.rounds_contributed,
                             examples_contributed=v.examples_contributed) for v in store.leaderboard()]

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(store, project_info()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        return HTMLResponse(render_dashboard(store, project_info(), str(request.base_url).rstrip("/")))

    return app


def _project_info(project_dir: Path, store: Store, info: Mapping | None, manifest_of: Any) -> dict:
    given = {k: v for k, v in dict(info or {}).items() if v is not None}
    toml = _toml_info(project_dir) if not {"id", "name", "base_model"} <= set(given) else {}
    latest = store.latest_release()
    manifest = manifest_of(latest) if latest is not None else None
    out = {**toml, **given}
    key_file = project_dir / RELEASE_PUBLIC_KEY
    if not out.get("public_key") and key_file.is_file():
        out["public_key"] = key_file.read_text().strip()
    if manifest is not None:
        out.setdefault("id", manifest.project_id)
        out.setdefault("base_model", manifest.base_model_id)
        out.setdefault("base_model_revision", manifest.base_model_revision)
        out.setdefault("public_key", manifest.signer)
    public = out.get("public_key")
    if isinstance(public, PublicKey):
        out["public_key"] = public.openssh
    if out.get("public_key"):
        try:
            out["fingerprint"] = PublicKey.from_openssh(out["public_key"]).fingerprint
        except ProtocolError:
            out["public_key"] = None
    out.setdefault("id", project_dir.name)
    out.setdefault("name", out["id"])
    out.setdefault("base_model", "")
    out["latest_version"] = latest.version if latest is not None else None
    known = set(ProjectOut.model_fields)
    return {k: (v if k == "latest_version" or v is None else str(v)) for k, v in out.items() if k in known}


def _toml_info(project_dir: Path) -> dict:
    """Best-effort project facts from `project.toml`: a `[project]` table first, then anywhere."""
    try:
        data = tomllib.loads((project_dir / "project.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    tables = [data.get("project", {}), data] + [v for v in data.values() if isinstance(v, dict)]
    names = {"id": ("id", "project_id"), "name": ("name",), "base_model": ("base_model", "base_model_id"),
             "base_model_revision": ("base_model_revision", "revision"), "mode": ("mode",),
             "membership": ("membership",)}
    out = {}
    for field, aliases in names.items():
        for table in tables:
            found = next((table[a] for a in aliases if isinstance(table.get(a), str | int)), None)
            if found is not None:
                out[field] = str(found)
                break
    return out


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as [start, end); None to send the whole file.

    Other units and multi-range requests are ignored (the whole file is sent, as RFC 9110
    allows); a malformed or unsatisfiable byte range raises `_RangeNotSatisfiable`.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    match = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if not match or match.groups() == ("", ""):
        raise _RangeNotSatisfiable
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _RangeNotSatisfiable
        return max(size - length, 0), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        raise _RangeNotSatisfiable
    return start, end


def _read(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


# -- Prometheus -------------------------------------------------------------


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float | int | None) -> str:
    return "NaN" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def prometheus_text(store: Store, project: ProjectOut) -> str:
    status = store.status().to_json()
    rounds = store.rounds()
    last = next((r for r in reversed(rounds) if r.status == "aggregated"), None)
    latest = status["latest_release"]
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, Any]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")

    metric("loracommons_info", "gauge", "Project facts as labels.",
           [({"project": project.id, "base_model": project.base_model, "mode": project.mode or "",
              "membership": project.membership or ""}, 1)])
    metric("loracommons_rounds", "gauge", "Rounds by status.",
           [({"status": s}, n) for s, n in status["rounds"]["by_status"].items()])
    metric("loracommons_last_closed_round", "gauge", "Number of the last closed round.",
           [({}, status["rounds"]["last_closed"])])
    metric("loracommons_updates_total", "counter", "Updates received, by admission outcome.",
           [({"outcome": o}, status["updates"][o]) for o in ("admitted", "rejected")])
    metric("loracommons_updates_rejected_total", "counter", "Rejected updates by reason code.",
           [({"reason": r}, n) for r, n in status["updates"]["rejected_by_reason"].items()])
    vols = status["volunteers"]
    metric("loracommons_volunteers", "gauge", "Volunteer keys by state.",
           [({"state": s}, vols[s]) for s in ("known", "registered", "banned", "contributed")])
    metric("loracommons_latest_release_version", "gauge", "Version of the latest release (0: none).",
           [({}, latest["version"] if latest else 0)])
    metric("loracommons_train_loss", "gauge", "Example-weighted train loss of the last aggregated round.",
           [({}, last.train_loss if last else None)])
    metric("loracommons_eval_loss", "gauge", "Eval loss of the last aggregated round.",
           [({}, last.eval_loss if last else None)])
    return "\n".join(out) + "\n"


# -- dashboard --------------------------------------------------------------


def _line_chart(series: dict[str, list[tuple[int, float]]], colors: dict[str, str],
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


def _bar_chart(rounds: list[RoundRow], width: int = 640, height: int = 200) -> str:
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
        base = height - pad_b
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


def render_dashboard(store: Store, project: ProjectOut, base_url: str) -> str:
    rounds = store.rounds()
    closed = [r for r in rounds if r.status != "open"]
    train = [(r.round, r.train_loss) for r in closed if r.train_loss is not None]
    evals = [(r.round, r.eval_loss) for r in closed if r.eval_loss is not None]
    latest = store.latest_release()
    e = html.escape
    if latest is not None:
        pin = project.fingerprint or "FINGERPRINT"
        command = f"loracommons download {base_url} --out adapter --pin {pin}"
        release = (f"<p>Version <b>v{latest.version}</b> (round {latest.round}, {e(latest.created)})"
                   f"<br>manifest <code>{latest.manifest_digest}</code></p>"
                   f"<pre>{e(command)}</pre>")
    else:
        release = "<p>No release yet.</p>"
    rows = "".join(
        f"<tr><td>{r.round}</td><td>{e(r.status)}</td><td>{r.admitted}</td><td>{r.rejected}</td>"
        f"<td>{_cell(r.train_loss)}</td><td>{_cell(r.eval_loss)}</td><td>{e(r.note or '')}</td></tr>"
        for r in reversed(rounds[-20:]))
    board = "".join(
        f"<tr><td><code>{v.short}</code></td><td>{e(v.display_name or '')}</td>"
        f"<td>{v.rounds_contributed}</td><td>{v.examples_contributed}</td></tr>"
        for v in store.leaderboard(limit=20))
    page = Template((_STATIC / "dashboard.html").read_text())
    return page.substitute(
        title=e(project.name), project_id=e(project.id), base_model=e(project.base_model),
        mode=e(project.mode or "-"), membership=e(project.membership or "-"),
        fingerprint=e(project.fingerprint or "-"),
        loss_chart=_line_chart({"train loss": train, "eval loss": evals},
                               {"train loss": "#1565c0", "eval loss": "#ef6c00"}),
        participation_chart=_bar_chart(rounds[-60:]), release=release, rounds=rows, leaderboard=board,
    )


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"

