"""The paced SuperNode entry point is Flower's own command."""

from __future__ import annotations

import subprocess
import sys


def test_entry_point_is_flowers_command():
    done = subprocess.run([sys.executable, "-m", "loracommons.client.supernode", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "flower-supernode" in done.stdout and "--superlink" in done.stdout
