"""The dashboard as a person sees it: rendered by headless Chromium from a live server, at a
laptop width (1280 px) and a phone width (375 px).

Needs Debian's `chromium` (CI installs it). Screenshots are kept under `test-artifacts/` (or
$LC_TEST_ARTIFACTS) for a human to look at. The phone check measures the page's width through
the DevTools protocol: at 375 px nothing may push the page sideways (wide tables scroll inside
their own box).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.service import start_http
from loracommons.coordinator.store import Store
from loracommons.protocol.errors import Reason
from loracommons.protocol.identity import SigningKey
from tests.e2e.procs import free_port

from . import PROJECT, publish_n, volunteer_fp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LC_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
EVAL = [2.9, 2.2, 1.8, 1.5, 1.3]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--hide-scrollbars", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]
EVAL_POINT = re.compile(r'data-series="held-out loss \(federated\)" data-round="(\d+)" data-value="([\d.]+)"')

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A coordinator's API on five closed rounds (with federated eval) and an open sixth round."""
    folder = tmp_path_factory.mktemp("dashboard")
    key = SigningKey.generate("coordinator")
    store = Store(folder)
    for r, loss in enumerate(EVAL, start=1):
        store.open_round(r, f"n{r}", base_version=r - 1, sampled=3)
        for i in range(3):
            train = loss - 0.5 + i / 9
            store.record_update(r, volunteer_fp(i + 1), "admitted", examples=40, train_loss=train)
        reason = Reason.BAD_SIGNATURE if r % 2 else Reason.LATE
        store.record_update(r, volunteer_fp(9), "rejected", reason=reason)
        store.close_round(r, "aggregated", eval_loss=loss)
    publish_n(folder, store, key, 2)
    store.open_round(6, "n6", base_version=2, sampled=3)
    store.record_update(6, volunteer_fp(1), "admitted", examples=40, train_loss=0.7)
    port = free_port()
    server, thread = start_http(create_app(folder, store, info={**PROJECT, "public_key": key.public.openssh}),
                                "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_dashboard_shows_the_eval_curve_volunteers_and_the_open_round(dashboard_url: str, tmp_path: Path):
    dom = chromium("--dump-dom", dashboard_url, user_dir=tmp_path / "chrome-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert [(int(r), float(v)) for r, v in EVAL_POINT.findall(page)] == list(enumerate(EVAL, start=1))
    assert page.count("<polyline") == 2  # the eval curve and train loss beside it
    assert "loss <b>1.3000</b> at round 5" in page
    row = re.search(r'<tr data-fingerprint="0909-0909-0909-0909">(.*?)</tr>', page)
    assert row is not None and "<td>0</td>" in row.group(1)  # nothing admitted
    assert "<code>bad_signature</code></abbr> 3, " in row.group(1)
    assert "<code>late</code></abbr> 2" in row.group(1)
    assert "<b>3</b> sampled, <b>1</b> replied (1 admitted, 0 rejected), <b>2</b> still training" in page
    assert "round 5: 1 rejected (bad_signature 1)" in page  # a bar's hover text
    assert "loracommons download" in page and "<script" not in page


def test_dashboard_screenshot_at_1280(dashboard_url: str, tmp_path: Path):
    shot = ARTIFACTS / "dashboard-1280.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    result = chromium(f"--screenshot={shot}", "--window-size=1280,1400", dashboard_url,
                      user_dir=tmp_path / "chrome-shot")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    check_screenshot(shot, (1280, 1400))


def test_dashboard_fits_a_phone_width(dashboard_url: str, tmp_path: Path):
    """At 375 px (a phone, emulated through DevTools) the page is no wider than the screen."""
    websockets = pytest.importorskip("websockets.sync.client")
    assert CHROMIUM is not None
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chrome-cdp'}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    shot = ARTIFACTS / "dashboard-375.png"
    try:
        port = _devtools_port(proc)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            _call(ws, "Emulation.setDeviceMetricsOverride",
                  {"width": 375, "height": 1600, "deviceScaleFactor": 1, "mobile": True})
            _call(ws, "Page.navigate", {"url": dashboard_url})
            deadline = time.monotonic() + 30
            while _evaluate(ws, "document.readyState + ' ' + location.href") != f"complete {dashboard_url}":
                assert time.monotonic() < deadline, "the dashboard did not load"
                time.sleep(0.2)
            inner, scroll = _evaluate(ws, "[window.innerWidth, document.documentElement.scrollWidth]")
            png = _call(ws, "Page.captureScreenshot", {"format": "png"})["data"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert inner == 375 and scroll <= inner, f"the page is {scroll} px wide at a {inner} px viewport"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot.write_bytes(base64.b64decode(png))
    check_screenshot(shot, (375, 1600))


def check_screenshot(shot: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == size
    colors = {c: n for n, c in image.getcolors(maxcolors=1 << 20) or []}
    assert len(colors) > 20, "the page rendered blank"
    assert colors.get((239, 108, 0), 0) > 50, "the eval curve (#ef6c00) is not on screen"


def _devtools_port(proc: subprocess.Popen) -> int:
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError("chromium did not open its DevTools port")


def _call(ws, method: str, params: dict) -> dict:
    """One DevTools command and its result (events arriving meanwhile are skipped)."""
    ws.send(json.dumps({"id": 1, "method": method, "params": params}))
    while True:
        reply = json.loads(ws.recv(timeout=10))
        if reply.get("id") == 1:
            assert "error" not in reply, reply
            return reply["result"]


def _evaluate(ws, expression: str):
    return _call(ws, "Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"]["value"]
