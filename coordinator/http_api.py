"""The coordinator's public, read-only HTTP API (FastAPI).

    app = create_app("myproject", store, info={"fleet_address": "host:9092"})
    uvicorn.run(app, host="0.0.0.0", port=8080)

Endpoints: /api/project, /api/releases, /api/releases/latest, /api/releases/{version},
/api/releases/{version}/files/{name} (HTTP range requests), /api/rounds, /api/rounds/open,
/api/volunteers, /api/contributions,
/metrics (Prometheus text, `metrics.py`), /healthz, and / (the dashboard, `dashboard.py`).
Nothing here writes state; administration happens through the CLI on the coordinator machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from prometheus_client import generate_latest
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from loracommons.coordinator.api_models import (
    ContributionOut,
    Health,
    OpenRoundOut,
    ProjectOut,
    ReleaseDocument,
    ReleaseOut,
    RoundOut,
    VolunteerOut,
)
from loracommons.coordinator.config import ConfigError, ProjectConfig, load_config
from loracommons.coordinator.dashboard import render_dashboard
from loracommons.coordinator.metrics import CONTENT_TYPE, ProjectLabels, metrics_registry
from loracommons.coordinator.releases import read_release, release_dir
from loracommons.coordinator.rows import ReleaseRow
from loracommons.coordinator.store import Store
from loracommons.protocol.canonical import parse_json
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey
from loracommons.protocol.release import MANIFEST_FILE, ReleaseManifest, check_file_name

log = logging.getLogger(__name__)

MAX_VERSION = 2**31 - 1
RELEASE_PUBLIC_KEY = Path("keys") / "release_key.pub"  # written by `coordinator init`
_MEDIA = {".json": "application/json", ".md": "text/markdown; charset=utf-8",
          ".safetensors": "application/octet-stream"}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such release or file"}}
_BINARY: dict[str, Any] = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                               "format": "binary"}}}}


def create_app(project_dir: str | Path, store: Store, info: Mapping[str, Any] | None = None,
               config: ProjectConfig | None = None) -> FastAPI:
    """Build the app. `info` (any of ProjectOut's fields, e.g. the fleet address and the release
    public key) is read on every request, so the caller may fill in keys later. Facts it lacks
    come from `config` (default: `project.toml`, when it loads), the release key file and the
    latest release."""
    project_dir = Path(project_dir)
    if config is None:
        config = _try_load_config(project_dir)
    app = FastAPI(title="LoRA Commons coordinator", version="1",
                  description="Read-only public API of a LoRA Commons coordinator.")
    manifests: dict[str, ReleaseManifest] = {}

    def manifest_of(row: ReleaseRow) -> ReleaseManifest:
        if row.manifest_digest not in manifests:
            signed = read_release(project_dir, row.version)
            manifests[row.manifest_digest] = ReleaseManifest.from_dict(
                parse_json(signed.manifest, max_bytes=1 << 20, what="release manifest"))
        return manifests[row.manifest_digest]

    def release_row(version: int) -> ReleaseRow:
        row = store.release(version)
        if row is None:
            raise HTTPException(404, f"no release v{version}")
        return row

    def project_info() -> ProjectOut:
        return project_facts(project_dir, store, info, config, manifest_of)

    def labels() -> ProjectLabels:
        p = project_info()
        return ProjectLabels(project=p.id, base_model=p.base_model, mode=p.mode or "",
                             membership=p.membership or "")

    registry = metrics_registry(store, labels)

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
    def get_file(version: int = PathParam(ge=1, le=MAX_VERSION),
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
        return ReleaseFile(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                           headers={"ETag": f'"{files[name]["sha256"]}"'})

    @app.get("/api/rounds", response_model=list[RoundOut])
    def list_rounds() -> list[RoundOut]:
        return RoundOut.all_from_store(store)

    @app.get("/api/rounds/open", response_model=OpenRoundOut | None)
    def open_round() -> OpenRoundOut | None:
        """The round in progress (sampled, replied, waiting, each reply's outcome); null when none."""
        return OpenRoundOut.from_store(store)

    @app.get("/api/contributions", response_model=list[ContributionOut])
    def list_contributions() -> list[ContributionOut]:
        """Each key that sent an update: admitted and rejected (by reason), examples, last seen."""
        return [ContributionOut.from_row(c) for c in store.contributions()]

    @app.get("/api/volunteers", response_model=list[VolunteerOut])
    def list_volunteers() -> list[VolunteerOut]:
        return [VolunteerOut(fingerprint=v.short, display_name=v.display_name,
                             rounds_contributed=v.rounds_contributed,
                             examples_contributed=v.examples_contributed) for v in store.leaderboard()]

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        return HTMLResponse(render_dashboard(store, project_info(), str(request.base_url).rstrip("/")))

    return app


class ReleaseFile(FileResponse):
    """Starlette's FileResponse (it serves single and multiple byte ranges) with this API's policy:
    a Range in another unit or with several ranges is ignored (the whole file, as RFC 9110
    allows), and a byte range that cannot be served is 416, never 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _single_byte_range(scope):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
        await super().__call__(scope, receive, send)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:  # e.g. "bytes=9-3", "bytes=x-y", a start of 4,300+ digits
            raise RangeNotSatisfiable(file_size) from None


def _single_byte_range(scope: Scope) -> bool:
    ranges = [v for k, v in scope.get("headers", []) if k.lower() == b"range"]
    if len(ranges) != 1:
        return False
    unit, _, spec = ranges[0].decode("latin-1").partition("=")
    return unit.strip().lower() == "bytes" and "," not in spec


def _try_load_config(project_dir: Path) -> ProjectConfig | None:
    """The project's config; None when there is none or it does not load (the API still answers)."""
    try:
        return load_config(project_dir)
    except ConfigError as exc:
        if (project_dir / "project.toml").exists():
            log.warning("HTTP API: project facts come without project.toml: %s", exc)
        return None


def project_facts(project_dir: Path, store: Store, info: Mapping[str, Any] | None,
                  config: ProjectConfig | None,
                  manifest_of: Callable[[ReleaseRow], ReleaseManifest]) -> ProjectOut:
    """`info` first, then the config, the release key file and the latest release."""
    out: dict[str, Any] = {}
    if config is not None:
        p = config.project
        out = {"id": p.id, "name": p.name, "base_model": p.base_model,
               "base_model_revision": p.base_model_revision, "mode": config.aggregation.mode,
               "membership": p.membership}
    out.update({k: v for k, v in (info or {}).items() if v is not None})
    key_file = project_dir / RELEASE_PUBLIC_KEY
    if not out.get("public_key") and key_file.is_file():
        out["public_key"] = key_file.read_text().strip()
    latest = store.latest_release()
    if latest is not None:
        manifest = manifest_of(latest)
        out.setdefault("id", manifest.project_id)
        out.setdefault("base_model", manifest.base_model_id)
        out.setdefault("base_model_revision", manifest.base_model_revision)
        out.setdefault("public_key", manifest.signer)
    if isinstance(out.get("public_key"), PublicKey):
        out["public_key"] = out["public_key"].openssh
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
    return ProjectOut.model_validate({k: (v if k == "latest_version" or v is None else str(v))
                                      for k, v in out.items() if k in known})
