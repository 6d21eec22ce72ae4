"""`python -m loracommons download` as a user runs it, against a live coordinator API."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from . import WEIGHTS, make_project, project_app, serve

# Runs the CLI with torch and flwr made unimportable, as on a download-only install.
_NO_TORCH = textwrap.dedent("""
    import runpy, sys
    sys.modules["torch"] = None
    sys.modules["flwr"] = None
    sys.argv = ["loracommons", *sys.argv[1:]]
    runpy.run_module("loracommons", run_name="__main__")
""")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coordinator")
    store, key = make_project(folder, 2)
    with serve(project_app(folder, store, key)) as url:
        yield url, folder, key
    store.close()


def run(*args: str, no_torch: bool = False) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", _NO_TORCH] if no_torch else [sys.executable, "-m", "loracommons"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, env=os.environ)


def test_download_command_installs_and_summarizes(live, tmp_path: Path):
    url, folder, key = live
    out = tmp_path / "adapter"
    proc = run("download", url, "--out", str(out), "--pin", key.public.fingerprint[:32], no_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert f"release v2 (round 2) of project dl-project installed in {out}" in proc.stdout
    assert f"signed by coordinator key {key.public.fingerprint}" in proc.stdout
    assert "PeftModel.from_pretrained" in proc.stdout
    assert (out / WEIGHTS).read_bytes() == (folder / "releases" / "v2" / WEIGHTS).read_bytes()


def test_first_use_is_announced_then_remembered(live, tmp_path: Path):
    url, _, key = live
    first = run("download", url, "--out", str(tmp_path / "a"), "--version", "1")
    assert first.returncode == 0, first.stderr
    assert f"trusting coordinator key {key.public.short}" in " ".join(first.stderr.split())
    second = run("download", url, "--out", str(tmp_path / "a"))
    assert second.returncode == 0, second.stderr
    assert "first use" not in second.stderr and "chain verified from v1" in second.stdout
    older = run("download", url, "--out", str(tmp_path / "a"), "--version", "1")
    assert older.returncode == 1 and "rollback" in older.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--pin", "00" * 32], "not by the pinned key"),
    (["--pin", "xyz"], "at least 32 digits"),
    (["--pin", "3f2a-91bc-0d44-e7a1"], "at least 32 digits"),
    (["--version", "7"], "no release v7"),
])
def test_errors_are_one_line_with_exit_code_1(live, tmp_path: Path, args, message):
    url, _, _ = live
    out = tmp_path / "adapter"
    proc = run("download", url, "--out", str(out), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_help_documents_replace_and_the_pin_length():
    proc = run("download", "--help", no_torch=True)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "--replace" in text and "at least 32" in text
