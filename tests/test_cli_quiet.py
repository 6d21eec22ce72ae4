"""`loracommons demo` and `join` print no library progress bars or warnings; `--verbose` shows them.

Each case runs a fresh interpreter that sets up output as the CLI does (`configure_output`, what
the `loracommons` callback runs before any command) and then does what a volunteer does first:
load the base model (transformers' "Loading weights" bar) and wrap it with LoRA (peft asks the
deprecated `is_gradient_checkpointing`, a FutureWarning under transformers 5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from loracommons.cli import QUIET_ENV

VOLUNTEER_START = textwrap.dedent("""
    import sys
    from loracommons.cli import configure_output
    configure_output(verbose=sys.argv[1] == "verbose")

    from loracommons.client.model import apply_adapter, load_base
    from loracommons.protocol.lora import DEMO_MODEL_ID, init_adapter
    from loracommons.protocol.task import LoraSettings

    settings = LoraSettings(r=2, alpha=4.0)
    base, _ = load_base(DEMO_MODEL_ID, device="cpu")
    apply_adapter(base, settings, init_adapter(base, settings, seed=0), "ffa")
    print("ready")
""")
NOISE = ("Loading weights", "it/s]", "%|", "Warning", "is_gradient_checkpointing", "deprecated")


def run_start(mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    return subprocess.run([sys.executable, "-c", VOLUNTEER_START, mode], capture_output=True, text=True,
                          env=env, timeout=300)


def test_volunteer_start_is_quiet_by_default():
    result = run_start("quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "ready\n"
    output = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in output], output[-3000:]


def test_verbose_shows_the_libraries_progress_bars_and_warnings():
    result = run_start("verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" in result.stderr
    assert "is_gradient_checkpointing" in result.stderr  # a warning, through logging at --verbose
