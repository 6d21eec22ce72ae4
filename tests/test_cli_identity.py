"""End-to-end smoke of the identity commands through the real console script."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

LC = [sys.executable, "-m", "loracommons"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*LC, *args], capture_output=True, text=True, check=check, env=os.environ)


def test_identity_new_then_show(tmp_path: Path):
    key = tmp_path / "x" / "id"
    out = run("identity", "new", "--out", str(key)).stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "x" / "id.pub").read_text().startswith("ecdsa-sha2-nistp256 ")
    shown = json.loads(run("identity", "show", "--key", str(key), "--json").stdout)
    assert shown["fingerprint"] in out
    from_pub = json.loads(run("identity", "show", "--key", f"{key}.pub", "--json").stdout)
    assert from_pub["fingerprint"] == shown["fingerprint"]


def test_identity_new_refuses_overwrite(tmp_path: Path):
    key = tmp_path / "id"
    run("identity", "new", "--out", str(key))
    before = key.read_bytes()
    again = run("identity", "new", "--out", str(key), check=False)
    assert again.returncode != 0
    assert "--force" in again.stderr
    assert key.read_bytes() == before
    run("identity", "new", "--out", str(key), "--force")
    assert key.read_bytes() != before


def test_identity_default_path_under_config_dir(tmp_path: Path):
    out = run("identity", "new").stdout
    assert os.environ["XDG_CONFIG_HOME"] in out.replace("\n", "")


def test_version_and_help():
    assert run("--version").stdout.startswith("loracommons ")
    assert "identity" in run("--help").stdout


def test_protocol_imports_neither_torch_nor_flwr():
    code = (
        "import sys, loracommons.protocol; "
        "bad = [m for m in ('torch', 'flwr', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
