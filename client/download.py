"""Download a community adapter from a coordinator and verify it before a loader can see it.

    from loracommons.client.download import download
    result = download("http://coordinator:8000", "adapter", pin="<the coordinator's fingerprint>")
    # PeftModel.from_pretrained(base, "adapter")

Order of checks: the release manifest is verified against the pinned coordinator key
(given, or trusted on first use and stored in the user data dir), then against the chain
from the last version this user saw (an older version is refused as a rollback); which key
is trusted, and when another project or key is refused, is `loracommons.client.trust`. Each
file is streamed into a staging folder beside `out_dir`, reading at most its declared size,
and its sha256 checked; an interrupted download resumes there with an HTTP range
request. Only when every file verifies does the staging folder replace `out_dir`, in
one rename. Needs httpx and loracommons.protocol only: no torch, no flwr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loracommons.client.trust import DownloadError, Trust, normalize_pin
from loracommons.protocol.canonical import parse_json
from loracommons.protocol.durable import fsync_dir, synced_write
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey
from loracommons.protocol.release import (
    MANIFEST_FILE,
    MAX_RELEASE_BYTES,
    REQUIRED_FILES,
    ReleaseManifest,
    SignedRelease,
    check_file_name,
    verify_release,
)

log = logging.getLogger(__name__)

MAX_PROJECT_BYTES = 64 * 1024
CHUNK = 256 * 1024
_PROJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class DownloadResult:
    out_dir: Path
    project_id: str
    version: int
    round: int
    manifest_digest: str
    fingerprint: str  # the coordinator key the release verified against
    files: dict[str, int]  # name -> size
    trusted_on_first_use: bool
    previous_version: int | None  # last version this user had seen, None on first download
    resumed_bytes: int
    metrics: dict = field(default_factory=dict)


def download(
    url: str,
    out_dir: str | Path,
    version: int | str = "latest",
    pin: str | None = None,
    state_dir: str | Path | None = None,
    progress: bool | None = None,
    *,
    notify: Callable[[str], None] | None = None,
    timeout_s: float = 3600.0,
    read_timeout_s: float = 30.0,
    max_total_bytes: int = 64 << 30,
    replace: bool = False,
) -> DownloadResult:
    """Fetch, verify and install release `version` ("latest" or a number) into `out_dir`.

    Raises `DownloadError` for every failure; `out_dir` then holds what it held before.
    `timeout_s` bounds the whole download, `read_timeout_s` each wait for the server.
    `replace` allows another project or key than the one pinned at `url` or installed in `out_dir`.
    """
    job = _Download(url, Path(out_dir), version, pin, state_dir, bool(progress), notify or log.warning,
                    timeout_s, read_timeout_s, max_total_bytes, replace)
    try:
        return job.run()
    except DownloadError:
        raise
    except ProtocolError as exc:
        raise DownloadError(f"refused: {exc}") from None
    except httpx.TimeoutException:
        raise DownloadError(f"{job.url}: the server stopped answering ({job.where}); "
                            "run the same command again to resume") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"{job.url}: {type(exc).__name__}: {exc} ({job.where}); "
                            "run the same command again to resume") from None
    except OSError as exc:
        raise DownloadError(f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}") from None
    finally:
        job.close()


class _Download:
    def __init__(self, url: str, out_dir: Path, version: int | str, pin: str | None,
                 state_dir: str | Path | None, progress: bool, notify: Callable[[str], None],
                 timeout_s: float, read_timeout_s: float, max_total_bytes: int, replace: bool = False):
        self.url = _base_url(url)
        self.out_dir = out_dir.expanduser().absolute()
        self.version = _parse_version(version)
        self.trust = Trust(self.url, normalize_pin(pin) if pin else None, replace, notify, state_dir)
        self.progress = progress
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.max_total_bytes = max_total_bytes
        self.where = "connecting"
        self.client = httpx.Client(
            base_url=self.url, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(read_timeout_s, connect=min(read_timeout_s, 10.0)),
            headers={"Accept-Encoding": "identity", "User-Agent": "loracommons-download"},
        )

    def close(self) -> None:
        self.client.close()

    def run(self) -> DownloadResult:
        _check_out_dir(self.out_dir)
        project = self._project()
        project_id = project["id"]
        record = self.trust.record(project_id)
        want, record, first_use = self.trust.choose_key(project, record)

        signed = self._release(self.version)
        if want is None:  # first use, and the server announced no key: trust the release's signer
            want = PublicKey.from_openssh(_signer_of(signed)).fingerprint
        if first_use:
            first_use = self.trust.check_first_use(project_id, want)
        manifest = verify_release(signed, want)
        if manifest.project_id != project_id:
            raise DownloadError(f"release belongs to project {manifest.project_id!r}, "
                                f"the server says it serves {project_id!r}")
        if self.version != "latest" and manifest.version != self.version:
            raise DownloadError(f"asked for release v{self.version}, the server sent v{manifest.version}")
        previous = self.trust.check_chain(signed, manifest, want, record, self._release)
        self._check_files(manifest)
        self.trust.check_installed(self.out_dir, manifest)

        staging = self.out_dir.parent / f".{self.out_dir.name}.partial-{signed.digest[:16]}"
        staging.mkdir(parents=True, exist_ok=True)
        resumed = self._fetch_files(manifest, staging)
        synced_write(staging / MANIFEST_FILE, signed.to_json())
        fsync_dir(staging)
        self.where = "installing"
        _install(staging, self.out_dir)
        for stale in self.out_dir.parent.glob(f".{self.out_dir.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        fingerprint = self.trust.remember(signed, manifest, record)
        return DownloadResult(
            out_dir=self.out_dir, project_id=project_id, version=manifest.version, round=manifest.round,
            manifest_digest=signed.digest, fingerprint=fingerprint,
            files={n: i["size"] for n, i in sorted(manifest.files.items())}, trusted_on_first_use=first_use,
            previous_version=previous, resumed_bytes=resumed, metrics=dict(manifest.metrics),
        )

    # -- HTTP -------------------------------------------------------------

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise DownloadError(f"download took longer than {self.timeout_s:g} s ({self.where}); "
                                "run the same command again to resume")

    def _get_small(self, path: str, limit: int, missing: str = "") -> bytes:
        self.where = f"GET {path}"
        with self.client.stream("GET", path) as resp:
            if resp.status_code == 404:
                raise DownloadError(f"{self.url}{path}: {missing or 'not found'} (404)")
            if resp.status_code != 200:
                raise DownloadError(f"{self.url}{path}: the server answered HTTP {resp.status_code}")
            body = bytearray()
            for chunk in resp.iter_raw():
                self._check_deadline()
                body += chunk
                if len(body) > limit:
                    raise DownloadError(f"{self.url}{path}: response larger than {limit} bytes")
        return bytes(body)

    def _project(self) -> dict:
        data = self._get_small("/api/project", MAX_PROJECT_BYTES, "not a LoRA Commons coordinator")
        obj = parse_json(data, max_bytes=MAX_PROJECT_BYTES, what="project info")
        project_id = obj.get("id")
        if not isinstance(project_id, str) or not _PROJECT_ID.match(project_id):
            raise DownloadError(f"the server's project id {str(project_id)[:80]!r} is not a plain name")
        out = {"id": project_id, "fingerprint": None}
        if obj.get("public_key"):
            if not isinstance(obj["public_key"], str):
                raise DownloadError("the server's public_key is not a string")
            # Computed here, not taken from the server's own `fingerprint` field.
            out["fingerprint"] = PublicKey.from_openssh(obj["public_key"]).fingerprint
        return out

    def _release(self, version: int | str) -> SignedRelease:
        what = "no release published yet" if version == "latest" else f"no release v{version} on this server"
        data = self._get_small(f"/api/releases/{version}", MAX_RELEASE_BYTES, what)
        return SignedRelease.from_json(data)

    def _check_files(self, manifest: ReleaseManifest) -> None:
        for name in manifest.files:
            check_file_name(name)
        missing = [n for n in REQUIRED_FILES if n not in manifest.files]
        if missing:
            raise DownloadError(f"release v{manifest.version} lacks {missing[0]}; it is not a PEFT adapter")
        if MANIFEST_FILE in manifest.files:
            raise DownloadError(f"release v{manifest.version} lists a file named {MANIFEST_FILE}")
        total = sum(info["size"] for info in manifest.files.values())
        if total > self.max_total_bytes:
            raise DownloadError(f"release v{manifest.version} declares {total} bytes, over the "
                                f"{self.max_total_bytes} byte limit")

    def _fetch_files(self, manifest: ReleaseManifest, staging: Path) -> int:
        names = sorted(manifest.files)
        total = sum(manifest.files[n]["size"] for n in names)
        bar = _Progress(self.progress, total, f"v{manifest.version}")
        resumed = 0
        try:
            for name in names:
                resumed += self._fetch_file(manifest.version, name, manifest.files[name], staging, bar)
        finally:
            bar.close()
        return resumed

    def _fetch_file(self, version: int, name: str, info: dict, staging: Path, bar: _Progress) -> int:
        """Download one file into `staging`; returns the bytes reused from an earlier attempt."""
        size, want = info["size"], info["sha256"]
        final, part = staging / name, staging / f"{name}.part"
        if final.is_file():
            if final.stat().st_size == size and _sha256_file(final)[0].hexdigest() == want:
                bar.advance(size)
                return size
            final.unlink()
        have = part.stat().st_size if part.is_file() else 0
        if have > size:
            part.unlink()
            have = 0
        digest, have = _sha256_file(part) if have else (hashlib.sha256(), 0)
        reused = have
        bar.advance(have)
        if have < size:
            have, digest = self._stream(version, name, size, part, have, digest, bar)
        if have < size:
            raise DownloadError(f"{name}: the connection ended after {have} of {size} bytes; "
                                "run the same command again to resume")
        if digest.hexdigest() != want:
            part.unlink(missing_ok=True)
            raise DownloadError(f"refused: {name} does not match the sha256 in the signed manifest "
                                "(tampered or corrupted)")
        os.replace(part, final)
        return reused

    def _stream(self, version: int, name: str, size: int, part: Path, have: int, digest: Any,
                bar: _Progress) -> tuple[int, Any]:
        path = f"/api/releases/{version}/files/{name}"
        self.where = f"GET {path}"
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self.client.stream("GET", path, headers=headers) as resp:
            if resp.status_code == 206 and have:
                expected = f"bytes {have}-{size - 1}/{size}"
                if resp.headers.get("content-range", "").replace(" ", "") != expected.replace(" ", ""):
                    raise DownloadError(f"{name}: the server answered range {have}- with "
                                        f"{resp.headers.get('content-range')!r}, expected {expected!r}")
            elif resp.status_code == 200:
                if have:
                    bar.advance(-have)
                have, digest = 0, hashlib.sha256()
            elif resp.status_code == 404:
                raise DownloadError(f"{name}: the server has no such file in release v{version} (404)")
            else:
                raise DownloadError(f"{name}: the server answered HTTP {resp.status_code}")
            announced = resp.headers.get("content-length")
            if announced is not None and (not announced.isdigit() or int(announced) > size - have):
                raise DownloadError(f"refused: the server announces {announced} bytes for {name}, "
                                    f"the signed manifest declares {size}")
            with open(part, "ab" if have else "wb") as fh:
                for chunk in resp.iter_raw():
                    self._check_deadline()
                    if have + len(chunk) > size:
                        fh.close()
                        part.unlink(missing_ok=True)
                        raise DownloadError(f"refused: the server sent more than the {size} bytes the signed "
                                            f"manifest declares for {name}")
                    fh.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    bar.advance(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        return have, digest


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(f"downloading {label}", total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _base_url(url: str) -> str:
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise DownloadError(f"{url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DownloadError(f"{url!r} is not an http(s) URL of a coordinator, e.g. http://host:8000")
    return str(parsed.copy_with(query=None, fragment=None)).rstrip("/")


def _parse_version(version: int | str) -> int | str:
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    if isinstance(version, str):
        text = version.strip().lower()
        if text == "latest":
            return "latest"
        if text.isdigit() and int(text) >= 1:
            return int(text)
    raise DownloadError(f"version {version!r} must be 'latest' or a release number (1, 2, ...)")


def _signer_of(signed: SignedRelease) -> str:
    obj = parse_json(signed.manifest, max_bytes=MAX_RELEASE_BYTES, what="release manifest")
    if not isinstance(obj.get("signer"), str):
        raise DownloadError("release manifest names no signer")
    return obj["signer"]


def _check_out_dir(out_dir: Path) -> None:
    """Refuse early to replace anything but a folder this tool wrote (or an empty one)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DownloadError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise DownloadError(f"{out_dir} is not empty and holds no {MANIFEST_FILE}: it is not an adapter "
                            "downloaded by loracommons, refusing to replace it")


def _install(staging: Path, out_dir: Path) -> None:
    """Move the verified folder into place: one rename, the previous adapter renamed away first."""
    _check_out_dir(out_dir)
    if not out_dir.exists():
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.urandom(4).hex()}"
    os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _sha256_file(path: Path) -> tuple[Any, int]:
    digest, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return digest, n

