"""Trust on first use cannot be bypassed by renaming the project (issue 15, item 2).

A server at an address the user pinned (a mirror, a man in the middle, a takeover) announces
another project id with its own key and serves releases it signed. Before the fix the
downloader found no trust record for that project id, trusted its key on first use and
installed its adapter into the same `--out` over the pinned one. Now: a new project at a pinned
address is refused unless its key is the pinned one (or `--pin`/`--replace` asks for it), and an
adapter of another project or key in `--out` is replaced only with `--replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from loracommons.client.download import download
from loracommons.client.trust import DownloadError, trust_dir
from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.releases import publish_release
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey

from . import ADAPTER_CONFIG, PROJECT, SECTION, WEIGHTS, adapter, served_project


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def other_project(folder: Path, project_id: str, key: SigningKey):  # noqa: ANN201
    """The API of a project `project_id` with two releases signed by `key` (what the attacker serves)."""
    info = {**PROJECT, "id": project_id, "public_key": key.public.openssh}
    section = dataclasses.replace(SECTION, id=project_id)
    store = Store(folder)
    for version in (1, 2):
        publish_release(folder, store, key, section, version, version, adapter(100 + version), ADAPTER_CONFIG,
                        metrics={}, update_digests=[f"{version:064x}"], contributors={"cd" * 32: 1})
    return create_app(folder, store, info=info), store


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    with served_project(tmp_path_factory.mktemp("coordinator")) as served:
        yield served


@pytest.fixture
def pinned(coordinator, tmp_path):
    """The user's state after downloading v3 with the real key pinned: (url, key, hostile, out, state)."""
    url, folder, key, hostile = coordinator
    real = hostile.real
    out, state = tmp_path / "place" / "adapter", tmp_path / "state"
    out.parent.mkdir()
    download(url, out, pin=key.public.fingerprint, state_dir=state)
    stores = []

    def take_over(project_id: str, attacker: SigningKey | None = None) -> SigningKey:
        attacker = attacker or SigningKey.generate("coordinator")
        app, store = other_project(tmp_path / f"attacker-{len(stores)}", project_id, attacker)
        stores.append(store)
        hostile.real = app
        return attacker

    try:
        yield url, key, take_over, out, state
    finally:
        hostile.real = real
        for store in stores:
            store.close()


def test_renamed_project_with_its_own_key_is_refused_and_changes_nothing(pinned, tmp_path):
    url, key, take_over, out, state = pinned
    before, trust_before = snapshot(out.parent), snapshot(state)
    attacker = take_over("dl-project-renamed")
    with pytest.raises(DownloadError, match=r"was pinned to project 'dl-project'.*now announces project "
                                            r"'dl-project-renamed'.*refusing") as info:
        download(url, out, state_dir=state)
    assert "\n" not in str(info.value) and attacker.public.fingerprint in str(info.value)
    assert snapshot(out.parent) == before and snapshot(state) == trust_before
    with pytest.raises(DownloadError, match="was pinned to project"):  # into another folder too
        download(url, tmp_path / "elsewhere", state_dir=state)
    assert not (tmp_path / "elsewhere").exists()


def test_an_adapter_of_another_project_or_key_is_replaced_only_when_asked(pinned, tmp_path):
    url, key, take_over, out, state = pinned
    before = snapshot(out.parent)
    attacker = take_over("dl-project-renamed")
    # an explicit pin trusts the new key, but does not by itself replace the installed adapter
    with pytest.raises(DownloadError, match=r"holds project 'dl-project' signed by key .*--replace"):
        download(url, out, pin=attacker.public.fingerprint, state_dir=state)
    assert snapshot(out.parent) == before
    other = download(url, tmp_path / "other", pin=attacker.public.fingerprint, state_dir=state)
    assert other.project_id == "dl-project-renamed"
    notes: list[str] = []
    replaced = download(url, out, pin=attacker.public.fingerprint, state_dir=state, replace=True,
                        notify=notes.append)
    assert replaced.project_id == "dl-project-renamed" and any("replacing" in n for n in notes)


def test_replace_accepts_a_new_project_at_a_pinned_address(pinned):
    url, key, take_over, out, state = pinned
    attacker = take_over("dl-project-renamed")
    result = download(url, out, state_dir=state, replace=True)
    assert result.trusted_on_first_use and result.fingerprint == attacker.public.fingerprint


def test_installed_adapter_stays_pinned_without_a_trust_record(pinned, tmp_path):
    """State dir lost (another account, a wiped cache): the adapter in --out still pins its key."""
    url, key, take_over, out, state = pinned
    before = snapshot(out.parent)
    take_over("dl-project")  # the same project id, another key
    with pytest.raises(DownloadError, match=r"holds project 'dl-project' signed by key .*refusing"):
        download(url, out, state_dir=tmp_path / "fresh-state")
    assert snapshot(out.parent) == before


def test_same_key_under_another_project_id_is_trusted_not_first_use(pinned, tmp_path):
    url, key, take_over, out, state = pinned
    take_over("dl-project-two", attacker=key)  # the operator's second project, same release key
    result = download(url, tmp_path / "two", state_dir=state)
    assert not result.trusted_on_first_use and result.fingerprint == key.public.fingerprint
    with pytest.raises(DownloadError, match="holds project 'dl-project'"):  # but not over the first one
        download(url, out, state_dir=state)


def test_downloads_from_other_addresses_are_unaffected(pinned, tmp_path):
    """A record pins its own address only: another project elsewhere is trusted on first use as before."""
    url, key, take_over, out, state = pinned
    assert [p.name for p in trust_dir(state).iterdir()] == ["dl-project.json"]
    (tmp_path / "second").mkdir()
    with served_project(tmp_path / "second") as (url2, _, key2, hostile2):
        hostile2.real, store = other_project(tmp_path / "second-api", "second", key2)
        try:
            result = download(url2, tmp_path / "second-adapter", state_dir=state)
        finally:
            store.close()
    assert result.trusted_on_first_use and (tmp_path / "second-adapter" / WEIGHTS).is_file()
