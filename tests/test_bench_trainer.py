"""bench/trainer_bench.py runs end to end and writes the JSON it promises (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "trainer_bench.py"


def test_trainer_bench_writes_json(tmp_path):
    out = tmp_path / "results" / "trainer.json"
    args = ["--steps", "2", "--batch", "2", "--seq-len", "16", "--repeats", "1", "--threads", "1",
            "--device", "cpu", "--out", str(out)]
    run = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ratio" in run.stdout
    result = json.loads(out.read_text())
    assert {"benchmark", "date", "machine", "config", "trainer", "bare_loop", "ratio"} <= set(result)
    assert {"torch", "transformers", "peft", "cpu_count", "device", "python"} <= set(result["machine"])
    assert result["config"]["steps"] == 2 and result["config"]["batch"] == 2
    model = result["config"]["model"]
    assert model["hidden_size"] == 128 and model["num_hidden_layers"] == 4
    for loop in ("trainer", "bare_loop"):
        assert result[loop]["steps"] == 2 and result[loop]["tokens"] == 2 * 2 * 16
        assert result[loop]["tokens_per_s"] > 0 and math.isfinite(result[loop]["final_loss"])
    expected = result["trainer"]["tokens_per_s"] / result["bare_loop"]["tokens_per_s"]
    assert math.isclose(result["ratio"], expected)
