"""Which coordinator key a download trusts: pins, trust on first use, and what is already installed.

A trust record per project (`trust_file`, JSON in the user data dir) stores the key the user
trusts, the address it was fetched from and the last release seen (the start of the chain the
next download verifies). `Trust` holds the rules one download follows: a `--pin` replaces the
stored key; a stored key is never silently replaced by the one a server announces; a project id
new to this user, at an address pinned to another project and key, is refused (a renamed project
or another server there); an adapter of another project or key in the output folder is not
replaced. `replace=True` (`--replace`) lifts the last two. `DownloadError` is defined here, at the
bottom of the download's imports, because these refusals are the download's refusals.
Needs loracommons.protocol only: no torch, no flwr.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loracommons.paths import data_dir
from loracommons.protocol.canonical import parse_json
from loracommons.protocol.durable import atomic_write
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey, fingerprint_display
from loracommons.protocol.release import DOMAIN as RELEASE_DOMAIN
from loracommons.protocol.release import (
    MANIFEST_FILE,
    MAX_RELEASE_BYTES,
    MIN_PIN_DIGITS,
    ReleaseManifest,
    SignedRelease,
    verify_chain,
    verify_release,
)


class DownloadError(Exception):
    """A download that was refused or failed; the message is one line for the user."""


def normalize_pin(pin: str) -> str:
    """A fingerprint or its prefix of 128 bits or more as lowercase hex: dashes, colons and spaces dropped."""
    text = re.sub(r"[\s:-]", "", str(pin)).lower()
    if not re.fullmatch(rf"[0-9a-f]{{{MIN_PIN_DIGITS},64}}", text):
        raise DownloadError(f"--pin {str(pin)[:80]!r} must be a hex fingerprint of at least {MIN_PIN_DIGITS} "
                            "digits (a shorter one can be matched by a made-up key); give the full one")
    return text


def trust_dir(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir or data_dir()) / "trust"


def trust_file(project_id: str, state_dir: str | Path | None = None) -> Path:
    return trust_dir(state_dir) / f"{project_id}.json"


@dataclass(frozen=True)
class Trust:
    """The trust rules of one download from `url` (a normalized base URL)."""

    url: str
    pin: str | None  # normalized (`normalize_pin`); None: the stored key, or trust on first use
    replace: bool  # allow another project or key than the one pinned at `url` or installed
    notify: Callable[[str], None]  # one line to the user: a replaced pin, first use, --replace
    state_dir: str | Path | None = None  # default: the user data dir

    def record(self, project_id: str) -> dict | None:
        """The stored trust record of `project_id`, None if there is none."""
        return _load_record(trust_file(project_id, self.state_dir))

    def choose_key(self, project: dict, record: dict | None) -> tuple[str | None, dict | None, bool]:
        """The fingerprint (or prefix) releases must verify against, the usable trust record,
        and whether this is trust on first use."""
        announced = project.get("fingerprint")
        if self.pin is not None:
            if record is not None and not record["fingerprint"].startswith(self.pin):
                self.notify(f"--pin {self.pin[:16]} differs from the key stored for project {project['id']} "
                            f"({record['fingerprint'][:16]}); the given pin replaces it")
                record = None
            return self.pin, record, False
        if record is not None:
            if announced and announced != record["fingerprint"]:
                raise DownloadError(
                    f"coordinator key changed: project {project['id']} was pinned to "
                    f"{fingerprint_display(record['fingerprint'])}, the server now presents "
                    f"{fingerprint_display(announced)}; refusing (pass --pin {announced} if you trust it)")
            return record["fingerprint"], record, False
        return announced, None, True

    def check_first_use(self, project_id: str, want: str) -> bool:
        """On first use of `project_id`: refuse a key other than the one pinned at this address for
        another project (a renamed project, or another server answering there), and tell the user
        when `want` is trusted on first use. Returns whether it is (False: the address's pinned key)."""
        for other in _records_at(self.url, self.state_dir):
            if other["fingerprint"] == want:
                return False
            if not self.replace:
                raise DownloadError(
                    f"{self.url} was pinned to project {other.get('project_id')!r} (key "
                    f"{fingerprint_display(other['fingerprint'])}); it now announces project {project_id!r} "
                    f"with key {fingerprint_display(want)}: refusing (a renamed project or another server at "
                    f"that address); if you trust the new key, pass --pin {want}")
        self.notify(f"trusting coordinator key {fingerprint_display(want)} ({want}) of project "
                    f"{project_id} on first use; pass --pin {want} to check it next time")
        return True

    def check_chain(self, signed: SignedRelease, manifest: ReleaseManifest, want: str, record: dict | None,
                    fetch: Callable[[int], SignedRelease]) -> int | None:
        """Refuse older versions and forks; verify every release between the last seen and this one
        (`fetch` gets one by number). Returns the last version seen before, None on first download."""
        if record is None:
            return None
        last = SignedRelease.from_json(record["last_release"].encode())
        last_manifest = verify_release(last, want)
        if manifest.version < last_manifest.version:
            raise DownloadError(f"refused: release v{manifest.version} is older than "
                                f"v{last_manifest.version}, which you already downloaded (rollback)")
        if manifest.version == last_manifest.version:
            if signed.digest != last.digest:
                raise DownloadError(f"refused: release v{manifest.version} differs from the v"
                                    f"{manifest.version} you downloaded before (forked chain)")
            return last_manifest.version
        between = [fetch(v) for v in range(last_manifest.version + 1, manifest.version)]
        verify_chain([*between, signed], want, after=last)
        return last_manifest.version

    def check_installed(self, out_dir: Path, manifest: ReleaseManifest) -> None:
        """Refuse to install over an adapter of another project or coordinator key unless `replace`."""
        installed = _installed_release(out_dir)
        new = (manifest.project_id, PublicKey.from_openssh(manifest.signer).fingerprint)
        if installed == new or not (out_dir / MANIFEST_FILE).is_file():
            return
        what = ("an adapter whose release.json does not verify" if installed is None else
                f"project {installed[0]!r} signed by key {fingerprint_display(installed[1])}")
        if self.replace:
            self.notify(f"replacing {out_dir}, which holds {what} (--replace)")
            return
        raise DownloadError(f"{out_dir} holds {what}; this release is project {new[0]!r} signed by key "
                            f"{fingerprint_display(new[1])}: refusing to install over it (pass --replace to "
                            "replace it, or choose another --out)")

    def remember(self, signed: SignedRelease, manifest: ReleaseManifest, record: dict | None) -> str:
        """Store the installed release as the project's last seen one; returns the signer's fingerprint."""
        signer = PublicKey.from_openssh(manifest.signer)
        _save_record(trust_file(manifest.project_id, self.state_dir), {
            "project_id": manifest.project_id, "url": self.url, "fingerprint": signer.fingerprint,
            "public_key": signer.openssh, "pinned": (record or {}).get("pinned") or _now(),
            "last_version": manifest.version, "last_release": signed.to_json().decode(),
        })
        return signer.fingerprint


def _load_record(path: Path) -> dict | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = parse_json(data, max_bytes=2 * MAX_RELEASE_BYTES, what=str(path))
        if not re.fullmatch(r"[0-9a-f]{64}", obj["fingerprint"]) or not isinstance(obj["last_release"], str):
            raise KeyError
    except (ProtocolError, KeyError, TypeError):
        raise DownloadError(f"trust record {path} is damaged; remove it to trust the coordinator "
                            "again") from None
    return obj


def _records_at(url: str, state_dir: str | Path | None) -> list[dict]:
    """The trust records of every project downloaded before from `url`."""
    out = []
    for path in sorted(trust_dir(state_dir).glob("*.json")):
        try:
            record = _load_record(path)
        except DownloadError:  # a damaged record of another project: reported when that one is used
            continue
        if record is not None and record.get("url") == url:
            out.append(record)
    return out


def _installed_release(out_dir: Path) -> tuple[str, str] | None:
    """(project id, signer fingerprint) of the release installed in `out_dir`; None if none parses."""
    try:
        data = (out_dir / MANIFEST_FILE).read_bytes()
        signed = SignedRelease.from_json(data)
        manifest = ReleaseManifest.from_dict(parse_json(signed.manifest, max_bytes=MAX_RELEASE_BYTES,
                                                        what="installed release manifest"))
        signer = PublicKey.from_openssh(manifest.signer)
        signer.verify(signed.signature, RELEASE_DOMAIN + bytes.fromhex(signed.digest))
    except (OSError, ProtocolError):
        return None
    return manifest.project_id, signer.fingerprint


def _save_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
