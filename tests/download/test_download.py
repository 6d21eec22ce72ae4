"""`download()` against the real API on 127.0.0.1, and against hostile servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from starlette.responses import Response, StreamingResponse

from loracommons.client.download import download
from loracommons.client.trust import DownloadError, normalize_pin, trust_file
from loracommons.coordinator.releases import load_chain
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import DOMAIN, ReleaseManifest, SignedRelease, sign_release

from . import WEIGHTS, served_project


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A project with three releases, served by the real API."""
    with served_project(tmp_path_factory.mktemp("coordinator")) as served:
        yield served


@pytest.fixture
def server(coordinator):
    url, folder, key, hostile = coordinator
    hostile.overrides.clear()
    hostile.requests.clear()
    return url, folder, key, hostile


@pytest.fixture
def place(tmp_path: Path):
    """Where downloads go: `out` inside an otherwise empty folder, and a separate state dir."""
    where = tmp_path / "place"
    where.mkdir()
    return where / "out", tmp_path / "state"


def weights(folder: Path, version: int) -> bytes:
    return (folder / "releases" / f"v{version}" / WEIGHTS).read_bytes()


def assert_clean_failure(out: Path):
    """Nothing a loader could pick up, and nothing but the resumable staging folder beside it."""
    assert not out.exists()
    for entry in out.parent.iterdir():
        assert entry.name.startswith(f".{out.name}.partial-"), entry
        assert all(p.name.endswith(".part") or p.name != WEIGHTS for p in entry.iterdir())


def test_download_latest_trusts_on_first_use(server, place):
    url, folder, key, _ = server
    out, state = place
    notes = []
    result = download(url, out, state_dir=state, notify=notes.append)
    assert (result.version, result.round, result.project_id) == (3, 3, "dl-project")
    assert result.trusted_on_first_use and result.previous_version is None
    assert result.fingerprint == key.public.fingerprint
    assert len(notes) == 1 and "on first use" in notes[0] and key.public.short in notes[0]
    v3 = folder / "releases" / "v3"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in v3.iterdir())
    for name in ("adapter_config.json", WEIGHTS, "README.md", "release.json"):
        assert (out / name).read_bytes() == (v3 / name).read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # staging gone
    record = json.loads(trust_file("dl-project", state).read_text())
    assert record["fingerprint"] == key.public.fingerprint and record["last_version"] == 3


def test_chain_is_verified_from_the_last_version_seen(server, place):
    url, folder, key, hostile = server
    out, state = place
    first = download(url, out, version=1, pin=key.public.fingerprint[:32], state_dir=state)
    assert first.version == 1 and not first.trusted_on_first_use
    assert (out / WEIGHTS).read_bytes() == weights(folder, 1)
    hostile.requests.clear()
    later = download(url, out, state_dir=state)  # pinned by the stored record now
    assert (later.version, later.previous_version, later.trusted_on_first_use) == (3, 1, False)
    assert (out / WEIGHTS).read_bytes() == weights(folder, 3)
    fetched = [path for path, _ in hostile.requests]
    assert "/api/releases/2" in fetched  # the intermediate manifest was checked
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # old adapter removed, not left beside
    again = download(url, out, version="3", state_dir=state)
    assert again.previous_version == 3


def test_older_version_is_refused_as_rollback(server, place):
    url, folder, key, _ = server
    out, state = place
    download(url, out, state_dir=state)
    before = (out / WEIGHTS).read_bytes()
    with pytest.raises(DownloadError, match=r"v2 is older than v3.*\(rollback\)"):
        download(url, out, version=2, state_dir=state)
    assert (out / WEIGHTS).read_bytes() == before


def test_server_rolling_back_latest_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    download(url, out, state_dir=state)
    v2 = (folder / "releases" / "v2" / "release.json").read_bytes()
    hostile.overrides["/api/releases/latest"] = lambda h: Response(v2, media_type="application/json")
    with pytest.raises(DownloadError, match="rollback"):
        download(url, tmp_out := out.parent / "other", state_dir=state)
    assert not tmp_out.exists()


def test_manifest_signed_by_another_key_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    attacker = SigningKey.generate("coordinator")
    real = SignedRelease.from_json((folder / "releases" / "v3" / "release.json").read_bytes())
    obj = ReleaseManifest.from_dict(json.loads(real.manifest)).__dict__ | {"signer": attacker.public.openssh}
    forged = sign_release(attacker, ReleaseManifest(**obj)).to_json()
    hostile.overrides["/api/releases/latest"] = lambda h: Response(forged, media_type="application/json")
    with pytest.raises(DownloadError, match=f"not by the pinned key {key.public.fingerprint[:16]}"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)


def test_changed_coordinator_key_after_first_use_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    download(url, out, version=1, state_dir=state)
    attacker = SigningKey.generate("coordinator")
    project = {"id": "dl-project", "name": "x", "base_model": "tiny/llama",
               "public_key": attacker.public.openssh}
    hostile.overrides["/api/project"] = lambda h: Response(json.dumps(project), media_type="application/json")
    with pytest.raises(DownloadError, match="coordinator key changed.*refusing"):
        download(url, out, state_dir=state)
    assert json.loads((out / "release.json").read_text())  # the v1 adapter is still there, untouched


def test_tampered_file_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    data = bytearray(weights(folder, 3))
    data[len(data) // 2] ^= 0xFF
    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: Response(bytes(data))
    with pytest.raises(DownloadError, match=f"refused: {WEIGHTS} does not match the sha256"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)
    assert not trust_file("dl-project", state).exists()  # nothing recorded as seen


def test_file_longer_than_declared_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    longer = weights(folder, 3) + b"\0" * 1000
    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: Response(longer)
    with pytest.raises(DownloadError, match="announces .* bytes for adapter_model"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)

    async def chunked():  # no Content-Length: the client must count
        yield longer

    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: StreamingResponse(chunked())
    with pytest.raises(DownloadError, match="sent more than the .* bytes the signed manifest declares"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)


def test_endless_response_stops_at_the_declared_size(server, place):
    url, folder, key, hostile = server
    out, state = place

    async def endless():
        while True:
            yield b"\0" * 65536
            await asyncio.sleep(0)

    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: StreamingResponse(endless())
    start = time.monotonic()
    with pytest.raises(DownloadError, match="sent more than"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert time.monotonic() - start < 10
    assert_clean_failure(out)


def test_slow_drip_hits_the_total_timeout(server, place):
    url, folder, key, hostile = server
    out, state = place

    async def drip():
        while True:
            yield b"\0"
            await asyncio.sleep(0.1)

    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: StreamingResponse(drip())
    start = time.monotonic()
    with pytest.raises(DownloadError, match="took longer than 1.5 s"):
        download(url, out, pin=key.public.fingerprint, state_dir=state, timeout_s=1.5)
    assert time.monotonic() - start < 6
    assert_clean_failure(out)


def test_path_in_file_name_is_refused(server, place):
    url, folder, key, hostile = server
    out, state = place
    real = SignedRelease.from_json((folder / "releases" / "v3" / "release.json").read_bytes())
    obj = json.loads(real.manifest)
    obj["files"]["../x.json"] = {"size": 2, "sha256": "0" * 64}
    # Even a manifest that carries a valid signature over a path is refused (signed as a raw dict).
    raw = canonical_json(obj)
    signature = key.sign(DOMAIN + hashlib.sha256(raw).digest())
    doc = SignedRelease(raw, signature).to_json()
    hostile.overrides["/api/releases/latest"] = lambda h: Response(doc, media_type="application/json")
    with pytest.raises(DownloadError, match=r"'\.\./x\.json' is not a plain file name"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)
    assert not (out.parent.parent / "x.json").exists() and not (out.parent / "x.json").exists()


def test_interrupted_download_resumes_with_a_range_request(server, place):
    url, folder, key, hostile = server
    out, state = place
    data = weights(folder, 3)
    half = len(data) // 2

    def cut(headers):
        async def body():
            yield data[:half]
            raise ConnectionResetError("server dies mid-file")

        return StreamingResponse(body(), headers={"Content-Length": str(len(data))})

    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = cut
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert_clean_failure(out)
    [staging] = list(out.parent.iterdir())
    assert (staging / f"{WEIGHTS}.part").stat().st_size == half

    hostile.overrides.clear()
    hostile.requests.clear()
    result = download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert (out / WEIGHTS).read_bytes() == data
    ranges = [r for path, r in hostile.requests if path.endswith(WEIGHTS)]
    assert ranges == [f"bytes={half}-"]
    assert result.resumed_bytes >= half
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_resume_restarts_when_the_server_ignores_ranges(server, place):
    url, folder, key, hostile = server
    out, state = place
    data = weights(folder, 3)
    staging = out.parent / f".out.partial-{load_chain(folder)[2].digest[:16]}"
    staging.mkdir()
    (staging / f"{WEIGHTS}.part").write_bytes(b"garbage" * 10)  # wrong bytes from an earlier attempt
    hostile.overrides[f"/api/releases/3/files/{WEIGHTS}"] = lambda h: Response(data)  # 200, whole file
    download(url, out, pin=key.public.fingerprint, state_dir=state)
    assert (out / WEIGHTS).read_bytes() == data


def test_refuses_to_replace_a_folder_it_did_not_write(server, place):
    url, _, key, _ = server
    out, state = place
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(DownloadError, match="not an adapter downloaded by loracommons"):
        download(url, out, state_dir=state)
    assert [p.name for p in out.iterdir()] == ["my_notes.txt"]
    assert not trust_file("dl-project", state).exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pin": "abc"}, "at least 32 digits"),
    ({"pin": "zz" * 16}, "hex fingerprint"),
    ({"pin": "3f2a-91bc-0d44-e7a1"}, "at least 32 digits"),  # 64 bits: within reach of a collision search
    ({"version": "newest"}, "'latest' or a release number"),
    ({"version": 0}, "'latest' or a release number"),
    ({"version": 9}, "no release v9 on this server"),
])
def test_bad_arguments_give_one_line_errors(server, place, kwargs, message):
    url, _, _, _ = server
    out, state = place
    with pytest.raises(DownloadError, match=message) as info:
        download(url, out, state_dir=state, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_unreachable_server_is_one_line(place):
    out, state = place
    with pytest.raises(DownloadError, match="ConnectError") as info:
        download("http://127.0.0.1:9", out, state_dir=state)
    assert "\n" not in str(info.value)
    with pytest.raises(DownloadError, match="not an http"):
        download("ftp://example.org", out, state_dir=state)


def test_normalize_pin():
    fp = "3f2a91bc0d44e7a1" + "0" * 48
    assert normalize_pin("3F2A-91BC-0D44-E7A1-0000-0000-0000-0000") == fp[:32]
    assert normalize_pin(fp) == fp
    with pytest.raises(DownloadError, match="at least 32 digits"):
        normalize_pin(fp[:31])


_NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None      # any `import torch` now raises ImportError
    sys.modules["flwr"] = None
    sys.modules["transformers"] = None
    from loracommons.client.download import download
    result = download(sys.argv[1], sys.argv[2], pin=sys.argv[3], state_dir=sys.argv[4])
    assert not any(m.split(".")[0] in ("torch", "flwr") and sys.modules[m] is not None for m in sys.modules)
    print("ok", result.version)
""")


def test_download_works_without_torch_or_flwr(server, place):
    url, folder, key, _ = server
    out, state = place
    args = [url, str(out), key.public.fingerprint, str(state)]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True,
                          timeout=60, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 3"
    assert (out / WEIGHTS).read_bytes() == weights(folder, 3)
