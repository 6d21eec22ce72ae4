"""A real download-only install: the project's core in a fresh virtualenv, without torch or flwr."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from . import make_project, project_app, serve

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


def test_core_install_downloads_without_torch_or_flwr(tmp_path: Path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # the core only: no [train] extra, so neither torch nor flwr is installed
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(ROOT)], check=True, timeout=540)
    missing = subprocess.run([python, "-c", "import importlib.util as u; "
                              "print([m for m in ('torch', 'flwr', 'transformers') if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert missing == "[]", f"download-only install pulled in {missing}"
    folder = tmp_path / "coordinator"
    store, key = make_project(folder, 2)
    try:
        with serve(project_app(folder, store, key)) as url:
            out = tmp_path / "adapter"
            result = subprocess.run(
                [env_dir / "bin" / "loracommons", "download", url, "--out", str(out),
                 "--pin", key.public.fingerprint],
                capture_output=True, text=True, timeout=120,
                env={"HOME": str(tmp_path / "home"), "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin"})
    finally:
        store.close()
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_model.safetensors").exists() and (out / "release.json").exists()
