"""The read-only HTTP API and dashboard, through FastAPI's TestClient."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.store import Store
from loracommons.protocol.errors import Reason
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import SignedRelease, verify_chain

from . import PROJECT, publish_n, volunteer_fp

KEY = SigningKey.generate("coordinator")


@pytest.fixture
def served(tmp_path: Path):
    store = Store(tmp_path)
    for r, (admitted, rejected) in enumerate([(3, 1), (2, 0), (3, 2)], start=1):
        store.open_round(r, f"n{r}", base_version=r - 1, sampled=4)
        for i in range(admitted):
            store.record_update(r, volunteer_fp(i + 1), "admitted", examples=10 * (i + 1), train_loss=3.0 / r)
        for _ in range(rejected):
            store.record_update(r, None, "rejected", reason="bad_signature")
        store.close_round(r, "aggregated", eval_loss=3.5 / r)
    publish_n(tmp_path, store, KEY, 3)
    store.open_round(4, "n4", base_version=3)
    app = create_app(tmp_path, store, info={**PROJECT, "public_key": KEY.public.openssh,
                                            "fleet_address": "127.0.0.1:9092"})
    with TestClient(app) as client:
        yield client, tmp_path, store
    store.close()


def test_health_and_project(served):
    client, _, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    project = client.get("/api/project").json()
    assert project == {"id": "test-project", "name": "Test community", "base_model": "tiny/llama",
                       "base_model_revision": "main", "mode": "ffa", "membership": "open",
                       "public_key": KEY.public.openssh, "fingerprint": KEY.public.fingerprint,
                       "fleet_address": "127.0.0.1:9092", "latest_version": 3}


def test_project_info_falls_back_to_project_toml_and_key_file(tmp_path: Path):
    (tmp_path / "project.toml").write_text(
        '[project]\nid = "from-toml"\nname = "Toml name"\nbase_model = "org/model"\n'
        'membership = "allowlist"\n[aggregation]\nmode = "exact"\n')
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "release_key.pub").write_text(KEY.public.openssh + "\n")
    store = Store(tmp_path)
    with TestClient(create_app(tmp_path, store)) as client:
        project = client.get("/api/project").json()
        assert client.get("/api/releases").json() == []
        assert client.get("/api/releases/latest").status_code == 404
        assert client.get("/").status_code == 200
        assert "loracommons_latest_release_version 0" in client.get("/metrics").text
    facts = [project[k] for k in ("id", "name", "base_model", "mode", "membership")]
    assert facts == ["from-toml", "Toml name", "org/model", "exact", "allowlist"]
    assert project["fingerprint"] == KEY.public.fingerprint and project["latest_version"] is None
    store.close()


def test_project_info_without_a_loadable_project_toml(tmp_path: Path):
    (tmp_path / "project.toml").write_text("[project]\nid = 'x'\nnot_a_key = 1\n")  # refused by the config
    store = Store(tmp_path)
    with TestClient(create_app(tmp_path, store)) as client:
        project = client.get("/api/project").json()
        assert client.get("/").status_code == 200 and client.get("/metrics").status_code == 200
    assert (project["id"], project["name"], project["base_model"]) == (tmp_path.name, tmp_path.name, "")
    store.close()


def test_releases_list_and_documents(served):
    client, folder, store = served
    listing = client.get("/api/releases").json()
    assert [(r["version"], r["round"]) for r in listing] == [(1, 1), (2, 2), (3, 3)]
    assert [r["manifest_digest"] for r in listing] == [r.manifest_digest for r in store.releases()]
    assert listing[2]["metrics"]["train_loss"] == pytest.approx(2 / 3)
    docs = []
    for version in (1, 2, 3):
        resp = client.get(f"/api/releases/{version}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        assert resp.content == (folder / "releases" / f"v{version}" / "release.json").read_bytes()
        docs.append(SignedRelease.from_json(resp.content))
    assert client.get("/api/releases/latest").content == docs[2].to_json()
    assert [m.version for m in verify_chain(docs, KEY.public)] == [1, 2, 3]


@pytest.mark.parametrize(("path", "status"), [
    ("/api/releases/4", 404),
    ("/api/releases/0", 422),
    ("/api/releases/-1", 422),
    ("/api/releases/abc", 422),
    ("/api/releases/1.5", 422),
    ("/api/releases/" + "9" * 30, 422),
    ("/api/releases/99999/files/README.md", 404),
    ("/api/releases/x/files/README.md", 422),
    ("/api/nothing", 404),
])
def test_bad_versions_are_404_or_422_never_500(served, path, status):
    client, _, _ = served
    assert client.get(path).status_code == status


def test_file_download_whole_and_ranges(served):
    client, folder, _ = served
    data = (folder / "releases" / "v2" / "adapter_model.safetensors").read_bytes()
    url = "/api/releases/2/files/adapter_model.safetensors"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-length"] == str(len(data))
    size = len(data)
    cases = {"bytes=0-9": (0, 10), "bytes=10-": (10, size), "bytes=-7": (size - 7, size),
             f"bytes=5-{size + 100}": (5, size), "bytes=-99999": (0, size),
             f"bytes={size - 1}-": (size - 1, size)}
    for header, (start, end) in cases.items():
        resp = client.get(url, headers={"Range": header})
        assert resp.status_code == 206, header
        assert resp.content == data[start:end], header
        assert resp.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", header
    for header in (f"bytes={size}-", "bytes=9-3", "bytes=-0", "bytes=x-y", "bytes=-"):
        resp = client.get(url, headers={"Range": header})
        assert resp.status_code == 416, header
        assert resp.headers["content-range"] == f"bytes */{size}"
    for header in ("bytes=" + "9" * 4300 + "-", "bytes=0-" + "9" * 5000):  # past int()'s digit limit
        resp = client.get(url, headers={"Range": header})
        assert resp.status_code in (206, 416), header[:20]
    resp = client.get(url, headers={"Range": "bytes=" + "9" * 4300 + "-"})
    assert (resp.status_code, resp.headers["content-range"]) == (416, f"bytes */{size}")
    for header in ("bytes=0-1,5-6", "items=0-1"):  # ignored: the whole file
        resp = client.get(url, headers={"Range": header})
        assert (resp.status_code, resp.content) == (200, data), header


@pytest.mark.parametrize("name", [
    "..%2F..%2Fstate.db", "%2E%2E%2Fv1%2Frelease.json", "..%5Cstate.db", "release.json", "state.db",
    "extra.json", "README.md%00.json", ".hidden.json", "adapter_model.safetensors.part", "x" * 300,
])
def test_only_manifest_files_are_served(served, name):
    client, folder, _ = served
    (folder / "releases" / "v1" / "extra.json").write_text("{}")  # on disk, not in the manifest
    resp = client.get(f"/api/releases/1/files/{name}")
    assert resp.status_code in (404, 422)
    assert b"SQLite" not in resp.content


def test_traversal_in_raw_path_never_escapes(served):
    client, _, _ = served
    for raw in ("/api/releases/1/files/../../../state.db", "/api/releases/1/files/%2e%2e/state.db"):
        resp = client.get(raw)
        assert resp.status_code in (404, 422) and b"SQLite" not in resp.content


def test_rounds_and_volunteers(served):
    client, _, _ = served
    rounds = client.get("/api/rounds").json()
    assert [(r["round"], r["status"], r["admitted"], r["rejected"]) for r in rounds] == [
        (1, "aggregated", 3, 1), (2, "aggregated", 2, 0), (3, "aggregated", 3, 2), (4, "open", 0, 0)]
    assert rounds[0]["eval_loss"] == pytest.approx(3.5) and "nonce" not in rounds[0]
    board = client.get("/api/volunteers").json()
    # 0202... and 0303... both gave 60 examples: more rounds ranks first.
    assert board[0] == {"fingerprint": "0202-0202-0202-0202", "display_name": None,
                        "rounds_contributed": 3, "examples_contributed": 60}
    assert len(board) == 3 and all(len(v["fingerprint"]) == 19 for v in board)


def test_metrics_are_prometheus_text(served):
    client, _, _ = served
    resp = client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families.values() for s in family.samples}
    assert samples[("loracommons_rounds", (("status", "aggregated"),))] == 3
    assert samples[("loracommons_updates_total", (("outcome", "admitted"),))] == 8
    assert samples[("loracommons_updates_rejected_total", (("reason", "bad_signature"),))] == 3
    assert samples[("loracommons_latest_release_version", ())] == 3
    assert samples[("loracommons_last_closed_round", ())] == 3
    assert samples[("loracommons_eval_loss", ())] == pytest.approx(3.5 / 3)
    assert families["loracommons_updates"].type == "counter"
    assert "# TYPE loracommons_updates_total counter" in resp.text.splitlines()
    info = families["loracommons_info"].samples
    assert info[0].labels == {"project": "test-project", "base_model": "tiny/llama", "mode": "ffa",
                              "membership": "open"}


def test_dashboard_draws_charts_offline(served):
    client, _, _ = served
    page = client.get("/").text
    assert '<svg id="loss-chart"' in page and '<svg id="participation-chart"' in page
    assert page.count("<polyline") == 2  # train and eval loss
    assert "<script" not in page and "cdn" not in page.lower()
    fingerprint = KEY.public.fingerprint
    assert f"loracommons download http://testserver --out adapter --pin {fingerprint}" in page
    assert "v3" in page and "Test community" in page
    # Rejections by reason, each with its meaning from protocol.errors.Reason.
    assert "<code>bad_signature</code></td><td>3</td>" in page
    assert Reason.BAD_SIGNATURE.doc in page


def test_open_round_progress_contributions_and_reasons_per_round(served):
    client, _, store = served
    assert client.get("/api/rounds/open").json()["replied"] == 0
    store.open_round(4, "n4b", base_version=3, sampled=3)
    store.record_update(4, volunteer_fp(1), "admitted", examples=12, received="2099-01-01T00:00:09Z")
    store.record_update(4, volunteer_fp(2), "rejected", reason=Reason.LATE, received="2099-01-01T00:00:10Z")
    progress = client.get("/api/rounds/open").json()
    assert {k: progress[k] for k in ("round", "sampled", "replied", "admitted", "rejected", "waiting")} == {
        "round": 4, "sampled": 3, "replied": 2, "admitted": 1, "rejected": 1, "waiting": 1}
    assert [(r["fingerprint"], r["outcome"], r["reason"]) for r in progress["replies"]] == [
        ("0101-0101-0101-0101", "admitted", ""), ("0202-0202-0202-0202", "rejected", "late")]
    rounds = client.get("/api/rounds").json()
    assert rounds[2]["rejected_by_reason"] == {"bad_signature": 2} and rounds[1]["rejected_by_reason"] == {}
    board = {c["fingerprint"]: c for c in client.get("/api/contributions").json()}
    rate = board["0202-0202-0202-0202"].pop("updates_per_hour")  # 3 updates from today to 2099
    assert 0 < rate < 3 / (70 * 365 * 24)
    assert board["0202-0202-0202-0202"] == {
        "fingerprint": "0202-0202-0202-0202", "display_name": None, "admitted": 3, "rejected": 1,
        "examples": 60, "last_seen": "2099-01-01T00:00:10Z", "rejected_by_reason": {"late": 1},
        "mean_staleness": None}
    assert board["0101-0101-0101-0101"]["admitted"] == 4  # the open round's admitted update counts
    page = client.get("/").text
    assert "<b>3</b> sampled, <b>2</b> replied (1 admitted, 1 rejected), <b>1</b> still training" in page
    assert f'<abbr title="{Reason.LATE.doc}"><code>late</code></abbr>' in page
    store.close_round(4, "skipped")
    assert client.get("/api/rounds/open").json() is None
    assert "No round is open." in client.get("/").text


def test_async_staleness_and_throughput_per_volunteer(tmp_path: Path):
    """Issue 13: the API and the dashboard show each update's staleness and each volunteer's throughput."""
    store = Store(tmp_path)
    store.open_round(1, "n1", base_version=0)
    for minute, staleness in ((0, 0), (10, 2), (20, 1)):
        store.record_update(1, volunteer_fp(1), "admitted", examples=10, staleness=staleness,
                            received=f"2030-01-01T00:{minute:02d}:00Z")
    with TestClient(create_app(tmp_path, store, info=PROJECT)) as client:
        row = client.get("/api/contributions").json()[0]
        replies = client.get("/api/rounds/open").json()["replies"]
        page = client.get("/").text
    store.close()
    assert row["mean_staleness"] == 1.0 and row["updates_per_hour"] == pytest.approx(9.0)
    assert [r["staleness"] for r in replies] == [0, 2, 1]
    assert "<td>1.00</td><td>9.0</td>" in page and ">updates/h</th>" in page


def test_dashboard_before_any_federated_evaluation_shows_train_loss(tmp_path: Path):
    store = Store(tmp_path)
    store.open_round(1, "n1", base_version=0, sampled=2)
    store.record_update(1, volunteer_fp(1), "admitted", examples=10, train_loss=2.0)
    store.close_round(1, "aggregated")
    with TestClient(create_app(tmp_path, store, info=PROJECT)) as client:
        page = client.get("/").text
    store.close()
    assert "No federated evaluation reported yet" in page and 'id="eval-latest"' not in page
    assert page.count("<polyline") == 1 and 'data-series="train loss" data-round="1" data-value="2"' in page


def test_dashboard_escapes_names_and_reasons(served):
    client, _, store = served
    key = SigningKey.generate("volunteer").public
    store.register_volunteer(key, "<script>alert(1)</script>")
    store.record_update(4, key.fingerprint, "rejected", reason='<img src=x onerror="y">')
    page = client.get("/").text
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page


def test_dashboard_leads_with_the_federated_evaluation(served):
    client, _, _ = served
    page = client.get("/").text
    assert "loss <b>1.1667</b> at round 3 (round 1: 3.5000, -2.3333 since)" in page
    points = re.findall(r'data-series="held-out loss \(federated\)" data-round="(\d+)" data-value="([\d.]+)"',
                        page)
    want = [(r, pytest.approx(3.5 / r, rel=1e-5)) for r in (1, 2, 3)]
    assert [(int(r), float(v)) for r, v in points] == want
    assert '<meta name="viewport"' in page


def test_openapi_declares_every_endpoint(served):
    client, _, _ = served
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/api/project", "/api/releases", "/api/releases/latest", "/api/releases/{version}",
        "/api/releases/{version}/files/{name}", "/api/rounds", "/api/volunteers", "/metrics", "/healthz", "/",
        "/api/rounds/open", "/api/contributions"}
    file_responses = spec["paths"]["/api/releases/{version}/files/{name}"]["get"]["responses"]
    assert {"200", "206", "404", "416"} <= set(file_responses)
    json.dumps(spec)
