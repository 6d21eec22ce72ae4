"""The dashboard as a person sees it: rendered by headless Chromium from a live server.

Needs Debian's `chromium` (CI installs it). The screenshot is kept under
`test-artifacts/` (or $LC_TEST_ARTIFACTS) for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.service import start_http
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey
from tests.e2e.procs import free_port

from . import PROJECT, publish_n, volunteer_fp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LC_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_dir}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def test_dashboard_renders_loss_chart_in_chromium(tmp_path: Path):
    from PIL import Image

    key = SigningKey.generate("coordinator")
    store = Store(tmp_path)
    losses = [3.1, 2.4, 1.9, 1.5, 1.2]
    for r, loss in enumerate(losses, start=1):
        store.open_round(r, f"n{r}", base_version=r - 1, sampled=3)
        for i in range(3):
            store.record_update(r, volunteer_fp(i + 1), "admitted", examples=40, train_loss=loss + 0.1 * i)
        store.record_update(r, None, "rejected", reason="bad_signature")
        store.close_round(r, "aggregated", eval_loss=loss + 0.2)
    publish_n(tmp_path, store, key, 2)
    port = free_port()
    app = create_app(tmp_path, store, info={**PROJECT, "public_key": key.public.openssh})
    server, thread = start_http(app, "127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{port}/"
        dom = chromium("--dump-dom", url, user_dir=tmp_path / "chrome-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert 'id="loss-chart"' in dom.stdout and "<polyline" in dom.stdout
        assert "loracommons download" in dom.stdout
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        result = chromium(f"--screenshot={shot}", "--window-size=1280,1400", "--hide-scrollbars", url,
                          user_dir=tmp_path / "chrome-shot")
        assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
        image = Image.open(shot).convert("RGB")
        assert image.size == (1280, 1400)
        colors = image.getcolors(maxcolors=1 << 20) or []
        assert len(colors) > 20, "the page rendered blank"
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()
