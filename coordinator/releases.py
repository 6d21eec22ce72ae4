"""Signed releases: PEFT adapter folders chained by signed manifests.

    DIR/releases/v3/adapter_config.json        what PeftModel.from_pretrained reads
    DIR/releases/v3/adapter_model.safetensors   the global adapter (PEFT key names)
    DIR/releases/v3/README.md                   model card, Hub-ready (`card.py`)
    DIR/releases/v3/release.json                signed manifest: the three files' size and
                                                sha256, digest of v2's manifest, ...

A release is built in `DIR/releases/.tmp-...`, fsynced, renamed to `v{N}` and only then
recorded in the store. A crash between the rename and the record leaves a folder without
a row; `reconcile` (run at start) adopts it when it verifies and chains, or removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loracommons.coordinator.card import CardFacts, model_card
from loracommons.coordinator.config import ConfigError, ProjectConfig, ProjectSection, load_config
from loracommons.coordinator.rows import ReleaseRow, utc_now
from loracommons.coordinator.store import Store
from loracommons.protocol.canonical import plain_json
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.durable import TEMP_PREFIX, fsync_dir, synced_write
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey, SigningKey
from loracommons.protocol.release import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ReleaseManifest,
    SignedRelease,
    sign_release,
    updates_digest,
    verify_chain,
    verify_release,
)

log = logging.getLogger(__name__)

RELEASES = "releases"
_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,9})$")
_TRASH_PREFIX = ".trash-"


class ReleaseError(Exception):
    """Publishing or checking local releases failed."""


def release_dir(project_dir: str | Path, version: int) -> Path:
    return Path(project_dir) / RELEASES / f"v{version}"


@dataclass
class ReconcileReport:
    adopted: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def publish_release(
    project_dir: str | Path,
    store: Store,
    key: SigningKey,
    project: ProjectSection,
    version: int,
    round: int,
    adapter_tensors: Mapping[str, np.ndarray],
    adapter_config: Mapping,
    metrics: Mapping | None = None,
    update_digests: Iterable[str] = (),
    contributors: Mapping[str, int] | Iterable[str] = (),
    config: ProjectConfig | None = None,
) -> SignedRelease:
    """Write, sign and record release `version`; returns its signed manifest.

    `project` gives the id, name, base model and revision the manifest and card carry; `config`
    (default: `project.toml` in `project_dir`, when it loads) the mode, rules and privacy the card states.
    `contributors` maps fingerprints to examples (or lists fingerprints). Publishing a version that is
    already recorded for the same round returns the recorded release unchanged.
    """
    project_dir = Path(project_dir)
    existing = store.release(version)
    if existing is not None:
        if existing.round != round:
            raise ReleaseError(f"release v{version} already exists for round {existing.round}")
        return read_release(project_dir, version)
    latest = store.latest_release()
    expected = (latest.version if latest else 0) + 1
    if version != expected:
        raise ReleaseError(f"next release is v{expected}, not v{version}")
    previous = ""
    if latest is not None:
        previous = read_release(project_dir, latest.version).digest
        if previous != latest.manifest_digest:
            raise ReleaseError(f"release v{latest.version} on disk differs from the recorded one")

    if not project.id or not project.base_model:
        raise ReleaseError("project info needs an id and a base model")
    weights = encode_tensors(dict(adapter_tensors), metadata={"format": "pt"})
    contributors = dict(contributors) if isinstance(contributors, Mapping) else {c: 0 for c in contributors}
    metrics_json: dict[str, Any] = plain_json(dict(metrics or {}))
    config_bytes = (json.dumps(plain_json(dict(adapter_config)), indent=2, sort_keys=True) + "\n").encode()
    card = model_card(CardFacts(
        project=project, version=version, round=round, metrics=metrics_json, contributors=contributors,
        signer=key.public, previous=previous, history=[r for r in store.rounds() if r.round <= round],
        volunteers=store.volunteers_admitted(through_round=round),
        config=config if config is not None else _config_beside(project_dir, project)))

    root = project_dir / RELEASES
    root.mkdir(parents=True, exist_ok=True)
    final = release_dir(project_dir, version)
    if final.exists():  # unrecorded leftover; reconcile would have adopted it if it chained
        _remove_tree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}v{version}-", dir=root))
    try:
        files = {}
        for name, data in ((CONFIG_FILE, config_bytes), (WEIGHTS_FILE, weights), (CARD_FILE, card.encode())):
            synced_write(tmp / name, data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = ReleaseManifest(
            format_version=FORMAT_VERSION, project_id=project.id, version=version, round=round,
            base_model_id=project.base_model, base_model_revision=project.base_model_revision,
            files=files, previous=previous, updates_digest=updates_digest(update_digests),
            metrics=metrics_json, created=utc_now(), signer=key.public.openssh,
        )
        signed = sign_release(key, manifest)
        synced_write(tmp / MANIFEST_FILE, signed.to_json())
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    adapter_digest = store.blobs.put(weights)
    store.add_release(version, round, signed.digest, created=manifest.created,
                      path=f"{RELEASES}/v{version}", adapter_digest=adapter_digest)
    log.info("published release v%d (round %d, manifest %s)", version, round, signed.digest[:16])
    return signed


def _config_beside(project_dir: Path, project: ProjectSection) -> ProjectConfig | None:
    """The project's own config when it is the project being released (it states mode and rules)."""
    try:
        config = load_config(project_dir)
    except ConfigError:
        return None
    return config if config.project.id == project.id else None


def _remove_tree(path: Path) -> None:
    """Remove a folder so that a crash midway never leaves a half folder under a release name."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.urandom(4).hex()}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def read_release(project_dir: str | Path, version: int) -> SignedRelease:
    path = release_dir(project_dir, version) / MANIFEST_FILE
    try:
        return SignedRelease.from_json(path.read_bytes())
    except FileNotFoundError:
        raise ReleaseError(f"release v{version} has no {MANIFEST_FILE} at {path}") from None
    except ProtocolError as exc:
        raise ReleaseError(f"release v{version}: {exc}") from None


def local_versions(project_dir: str | Path) -> list[int]:
    root = Path(project_dir) / RELEASES
    if not root.is_dir():
        return []
    found = (_VERSION_DIR.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def load_chain(project_dir: str | Path) -> list[SignedRelease]:
    """The signed manifests of every release folder, oldest first."""
    return [read_release(project_dir, v) for v in local_versions(project_dir)]


def check_files(folder: Path, manifest: ReleaseManifest) -> None:
    """Every file the manifest names is in `folder` with its declared size and sha256."""
    for name, info in manifest.files.items():
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ReleaseError(f"release v{manifest.version} lacks {name}") from None
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise ReleaseError(f"release v{manifest.version}: {name} differs from its manifest")


def verify_local_chain(project_dir: str | Path, pubkey: PublicKey | str) -> list[ReleaseManifest]:
    """Verify signatures, the chain from v1 and every file of every local release."""
    chain = load_chain(project_dir)
    try:
        manifests = verify_chain(chain, pubkey)
    except ProtocolError as exc:
        raise ReleaseError(f"local release chain: {exc}") from None
    for manifest in manifests:
        check_files(release_dir(project_dir, manifest.version), manifest)
    return manifests


def reconcile(project_dir: str | Path, store: Store, key: SigningKey | PublicKey) -> ReconcileReport:
    """Bring release folders and the store back in line after a crash; run before serving.

    Temporary and half-removed folders are deleted. A `v{N}` folder without a store row is
    adopted when it is the next version, verifies with `key`, chains to the latest recorded
    release and its files match; otherwise it is removed. A recorded release whose folder is
    missing or differs is an error: that is damage, not a crash.
    """
    project_dir = Path(project_dir)
    public = key.public if isinstance(key, SigningKey) else key
    report = ReconcileReport()
    root = project_dir / RELEASES
    if not root.is_dir():
        return report
    for leftover in sorted(root.iterdir()):
        if leftover.name.startswith((TEMP_PREFIX, _TRASH_PREFIX)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            report.removed.append(leftover.name)
    recorded = {row.version: row for row in store.releases()}
    for version, row in recorded.items():
        if read_release(project_dir, version).digest != row.manifest_digest:
            raise ReleaseError(f"release v{version} on disk differs from the recorded manifest")
    for version in local_versions(project_dir):
        if version in recorded:
            continue
        latest = store.latest_release()
        reason = _adoptable(project_dir, version, latest, public)
        if reason is None:
            signed = read_release(project_dir, version)
            manifest = verify_release(signed, public)
            weights = (release_dir(project_dir, version) / WEIGHTS_FILE).read_bytes()
            store.add_release(version, manifest.round, signed.digest, created=manifest.created,
                              path=f"{RELEASES}/v{version}", adapter_digest=store.blobs.put(weights))
            report.adopted.append(version)
            log.info("adopted release v%d left unrecorded by a crash", version)
        else:
            _remove_tree(release_dir(project_dir, version))
            report.removed.append(f"v{version}")
            log.warning("removed unrecorded release folder v%d: %s", version, reason)
    return report


def _adoptable(project_dir: Path, version: int, latest: ReleaseRow | None, public: PublicKey) -> str | None:
    """Why folder v{version} cannot be adopted, or None when it can."""
    expected = (latest.version if latest else 0) + 1
    if version != expected:
        return f"expected v{expected}"
    try:
        signed = read_release(project_dir, version)
        after = read_release(project_dir, latest.version) if latest else None
        manifest = verify_chain([signed], public, after=after)[0]
        if WEIGHTS_FILE not in manifest.files:
            return f"no {WEIGHTS_FILE}"
        check_files(release_dir(project_dir, version), manifest)
    except (ReleaseError, ProtocolError) as exc:
        return str(exc)
    return None
