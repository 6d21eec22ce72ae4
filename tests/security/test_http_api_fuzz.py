"""Schemathesis against the coordinator's own OpenAPI spec, served by a real uvicorn on 127.0.0.1.

The project behind it has releases, aggregated and skipped rounds, an open round, volunteers
(registered, banned, contributing) and updates with odd reasons and messages. Every operation
of the spec gets generated requests, valid and invalid (negative mode) ones: no answer may be a
5xx, and none may take a second or more. A bounded number of examples per operation keeps it short.

(`schemathesis.pytest.from_fixture` fails under pytest 9 in schemathesis 4.32 - it reads
`request.node._nodeid` - so the operations are driven through `as_strategy` and hypothesis.)
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.service import start_http
from loracommons.coordinator.store import Store
from tests.download import PROJECT, WEIGHTS, make_project
from tests.e2e.procs import free_port
from tests.security.community import record_result

MAX_EXAMPLES = 40
SLOWEST_S = 1.0


def fill_state(store: Store) -> None:
    """Rounds, volunteers and updates besides the releases, including awkward text."""
    from loracommons.protocol import SigningKey

    keys = [SigningKey.generate("volunteer").public for _ in range(3)]
    store.register_volunteer(keys[0], "Ada <script>alert(1)</script>")
    store.register_volunteer(keys[1], "名前 \u202e reversed")
    for r in (1, 2, 3):
        store.open_round(r, f"nonce{r}", base_version=r - 1, sampled=3)
        for i, key in enumerate(keys):
            outcome = "admitted" if i < 2 else "rejected"
            store.record_update(r, key.fingerprint, outcome, reason="" if i < 2 else "bad_signature",
                                message="delta norm 1.0" if i < 2 else "x" * 3000, examples=40 + i,
                                train_loss=2.0 / r, public_key=key.openssh)
        store.close_round(r, "aggregated" if r < 3 else "skipped", note="k=v, clipped=1")
    store.open_round(4, "nonce4", base_version=3, sampled=3)  # still open
    store.ban(keys[2].fingerprint)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coordinator")
    store, key = make_project(folder, 3)
    fill_state(store)
    info = {**PROJECT, "public_key": key.public.openssh, "fleet_address": "127.0.0.1:9092"}
    server, thread = start_http(create_app(folder, store, info), "127.0.0.1", free_port())
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(10)
    store.close()


def operations(api_url: str) -> list:
    """The spec's operations, as schemathesis reads them from the served /openapi.json."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(op, mode: GenerationMode, api_url: str, timings: list[float]) -> None:  # noqa: ANN001
    """Send MAX_EXAMPLES generated requests for one operation; each must answer < 500, within 1 s."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def call(case):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        response = case.call(base_url=api_url, timeout=10)
        elapsed = time.perf_counter() - started
        timings.append(elapsed)
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:300])
        assert elapsed < SLOWEST_S, (case.as_curl_command(), elapsed)

    call()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_no_slow_answer(api_url, mode):
    ops = operations(api_url)
    assert {op.path for op in ops} >= {"/api/project", "/api/releases/{version}/files/{name}", "/metrics"}
    timings: dict[str, list[float]] = {}
    for op in ops:
        try:
            fuzz(op, mode, api_url, timings.setdefault(f"{op.method.upper()} {op.path}", []))
        except Unsatisfiable:  # nothing invalid can be said to an operation without parameters
            assert mode is GenerationMode.NEGATIVE
    timings = {label: t for label, t in timings.items() if t}
    with_parameters = {"GET /api/releases/{version}", "GET /api/releases/{version}/files/{name}"}
    assert set(timings) >= (with_parameters if mode is GenerationMode.NEGATIVE else {
        f"{op.method.upper()} {op.path}" for op in ops}), sorted(timings)
    record_result("http_api", f"schemathesis_{mode.value}", {
        "operations": len(timings), "requests": sum(len(t) for t in timings.values()),
        "slowest_s": round(max(max(t) for t in timings.values()), 4), "server_errors": 0,
        "slow_answers": 0})


_VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)  # what an HTTP client will send


_RANGES = st.from_regex(r"bytes=[0-9-]{0,30}(,[0-9-]{0,20}){0,3}", fullmatch=True)


@given(header=st.one_of(st.text(_VISIBLE, max_size=60), _RANGES))
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_range_headers_never_break_the_file_endpoint(api_url, header):
    """The Range header is read by hand (not in the spec, so schemathesis does not vary it)."""
    started = time.perf_counter()
    response = httpx.get(f"{api_url}/api/releases/1/files/{WEIGHTS}", headers={"Range": header.strip()},
                         timeout=10)
    assert response.status_code in (200, 206, 416), (header, response.status_code)
    assert time.perf_counter() - started < SLOWEST_S
