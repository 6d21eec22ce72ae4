"""`loracommons download` against a hostile server, as a user runs it, over an adapter already installed.

tests/download/test_download.py already refuses each attack with `download()` into an empty
folder (tampered file, another key, rollback, longer file, endless body, path in a file name).
What this adds: the attack hits a user who already has v2 installed and runs the CLI to update:
the command must exit 1 with one clear line, leave the installed adapter byte for byte as it was,
leave the trust record as it was, and write nothing anywhere but its own resumable staging folder
beside --out (which never holds a complete weights file). Path names are also tried in several
spellings in a manifest signed with the real coordinator key (a compromised coordinator).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.responses import Response, StreamingResponse

from loracommons.client.download import download
from loracommons.client.trust import DownloadError
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import DOMAIN, ReleaseManifest, SignedRelease, sign_release
from tests.download import WEIGHTS, served_project
from tests.security.community import record_result


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_project(tmp_path_factory.mktemp("coordinator")) as served:
        yield served


def release_doc(folder: Path, version: int) -> bytes:
    return (folder / "releases" / f"v{version}" / "release.json").read_bytes()


def signed_with_files(folder: Path, key: SigningKey, extra: dict) -> bytes:
    """v3's manifest with extra file entries, signed with `key` as a raw dict (no client-side checks)."""
    obj = json.loads(SignedRelease.from_json(release_doc(folder, 3)).manifest)
    obj["files"].update(extra)
    raw = canonical_json(obj)
    return SignedRelease(raw, key.sign(DOMAIN + hashlib.sha256(raw).digest())).to_json()


def _json(data: bytes):  # noqa: ANN202
    return lambda headers: Response(data, media_type="application/json")


def tampered(folder: Path, key: SigningKey) -> dict:
    data = bytearray((folder / "releases" / "v3" / WEIGHTS).read_bytes())
    data[100] ^= 0x01
    return {f"/api/releases/3/files/{WEIGHTS}": lambda h: Response(bytes(data))}


def foreign_key(folder: Path, key: SigningKey) -> dict:
    attacker = SigningKey.generate("coordinator")
    real = json.loads(SignedRelease.from_json(release_doc(folder, 3)).manifest)
    forged = sign_release(attacker, ReleaseManifest(**{**real, "signer": attacker.public.openssh}))
    return {"/api/releases/latest": _json(forged.to_json())}


def rollback(folder: Path, key: SigningKey) -> dict:
    return {"/api/releases/latest": _json(release_doc(folder, 1))}


def longer(folder: Path, key: SigningKey) -> dict:
    data = (folder / "releases" / "v3" / WEIGHTS).read_bytes() + b"\0" * 4096

    async def body():  # no Content-Length: the client counts
        yield data

    return {f"/api/releases/3/files/{WEIGHTS}": lambda h: StreamingResponse(body())}


def endless(folder: Path, key: SigningKey) -> dict:
    async def body():
        while True:
            yield b"\0" * 65536
            await asyncio.sleep(0)

    return {f"/api/releases/3/files/{WEIGHTS}": lambda h: StreamingResponse(body())}


def traversal(folder: Path, key: SigningKey) -> dict:
    escape = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    doc = signed_with_files(folder, key, {"../../escape.json": escape})
    return {"/api/releases/latest": _json(doc), "/api/releases/3": _json(doc)}


ATTACKS = {
    "tampered_file": (tampered, "does not match the sha256 in the signed manifest"),
    "manifest_signed_by_another_key": (foreign_key, "not by the pinned key"),
    "rolled_back_version": (rollback, "rollback"),
    "file_longer_than_declared": (longer, "sent more than the"),
    "endless_response": (endless, "sent more than the"),
    "path_traversal_file_name": (traversal, "is not a plain file name"),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_update_over_an_installed_adapter_is_refused_and_changes_nothing(server, tmp_path, attack):
    url, folder, key, hostile = server
    hostile.overrides.clear()
    sandbox = tmp_path / "sandbox"
    out = sandbox / "adapters" / "community"
    out.parent.mkdir(parents=True)
    (sandbox / "neighbour.txt").write_text("a user's file next to the adapter folder")
    installed = download(url, out, version=2, pin=key.public.fingerprint)
    assert installed.version == 2
    state = Path(os.environ["XDG_DATA_HOME"])
    before, trust_before = snapshot(sandbox), snapshot(state)

    make, message = ATTACKS[attack]
    hostile.overrides.update(make(folder, key))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loracommons", "download", url, "--out", str(out),
                           "--pin", key.public.fingerprint], capture_output=True, text=True, timeout=120,
                          env=os.environ)
    seconds = time.monotonic() - started
    hostile.overrides.clear()

    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # not the progress bar
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()
    after = snapshot(sandbox)
    staged = {name for name in after if name.startswith("adapters/.community.partial-")}
    assert {n: h for n, h in after.items() if n not in staged} == before  # installed v2 untouched
    assert all(name.endswith(".part") or not name.endswith(WEIGHTS) for name in staged), staged
    assert snapshot(state) == trust_before  # still pinned at v2
    assert not list(tmp_path.rglob("escape.json"))
    assert seconds < 30
    record_result("downloads", attack, {"tries": 1, "refused": True, "exit_code": proc.returncode,
                                        "installed_adapter_unchanged": True, "written_outside_out": 0,
                                        "error": lines[0][:160], "seconds": round(seconds, 2)})


UNSAFE_NAMES = ["../escape.json", "../../escape.json", "/tmp/escape.json", "sub/escape.json",
                "..\\escape.json", ".escape.json", "escape.json\x00.md", "adapter_model.bin", "model.pt",
                "weights.pkl", "release.json"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_signed_manifest_naming_an_unsafe_file_is_refused(server, tmp_path, name):
    url, folder, key, hostile = server
    hostile.overrides.clear()
    escape = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    doc = signed_with_files(folder, key, {name: escape})
    hostile.overrides["/api/releases/latest"] = _json(doc)
    out = tmp_path / "place" / "out"
    out.parent.mkdir()
    try:
        with pytest.raises(DownloadError) as info:
            download(url, out, pin=key.public.fingerprint)
    finally:
        hostile.overrides.clear()
    assert "\n" not in str(info.value)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not list(tmp_path.rglob("*escape*")) and not Path("/tmp/escape.json").exists()
    record_result("download_file_names", repr(name), {"tries": 1, "refused": True,
                                                       "error": str(info.value)[:160]})


def test_renamed_project_at_the_pinned_address_is_refused_and_changes_nothing(server, tmp_path):
    """Issue 15, item 2: the server at the pinned address announces another project id with its own
    key and serves releases it signed; the user updates without --pin, as a pinned user does."""
    from tests.download.test_trust import other_project

    url, folder, key, hostile = server
    hostile.overrides.clear()
    sandbox = tmp_path / "sandbox"
    out = sandbox / "adapters" / "community"
    out.parent.mkdir(parents=True)
    download(url, out, version=2, pin=key.public.fingerprint)
    state = Path(os.environ["XDG_DATA_HOME"])
    before, trust_before = snapshot(sandbox), snapshot(state)
    real = hostile.real
    attacker = SigningKey.generate("coordinator")
    hostile.real, store = other_project(tmp_path / "mirror", "community-renamed", attacker)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "loracommons", "download", url, "--out", str(out)],
                              capture_output=True, text=True, timeout=120, env=os.environ)
    finally:
        hostile.real = real
        store.close()
    seconds = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "was pinned to project" in lines[0], proc.stderr
    assert snapshot(sandbox) == before and snapshot(state) == trust_before
    record_result("downloads", "renamed_project_new_key", {
        "tries": 1, "refused": True, "exit_code": proc.returncode, "installed_adapter_unchanged": True,
        "written_outside_out": 0, "error": lines[0][:160], "seconds": round(seconds, 2)})
