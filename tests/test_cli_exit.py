"""Every `loracommons` command leaves the interpreter's last garbage collection out of its exit: in
a `join` (torch, transformers and flwr loaded) that collection took seconds after "stopped"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# The checker is registered before the CLI runs, so it runs after the CLI's own exit handler.
COMMAND = textwrap.dedent("""
    import atexit, gc, sys
    atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
    from loracommons.cli import app
    app(["identity", "new", "--out", sys.argv[1]], prog_name="loracommons")
""")


def test_a_command_exits_with_its_heap_frozen(tmp_path):
    done = subprocess.run([sys.executable, "-c", COMMAND, str(tmp_path / "id")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "id").exists()
    assert "frozen at exit: True" in done.stdout, done.stdout + done.stderr
