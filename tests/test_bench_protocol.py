"""Smoke test of bench/protocol_bench.py: the real script, a tiny size, its JSON (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "protocol_bench.py"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_writes_its_json(tmp_path, dtype):
    out = tmp_path / "results" / "protocol.json"
    args = [sys.executable, str(BENCH), "--mb", "1", "--repeat", "1", "--dtype", dtype, "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.read_text())
    assert {
        "verify_mb_s",
        "sha256_mb_s",
        "ratio",
        "payload_bytes",
        "tensors",
        "repeat",
        "machine",
        "date",
    } <= set(result)
    assert {"platform", "cpu_count", "python", "numpy"} <= set(result["machine"])
    assert result["verify_mb_s"] > 0 and result["sha256_mb_s"] > 0
    # Both speeds are rounded to 0.1 MB/s and the ratio to 3 decimals, so a small ratio
    # (0.0217 -> 0.022) can be 1.4 % off the quotient of the rounded speeds.
    assert result["ratio"] == pytest.approx(result["verify_mb_s"] / result["sha256_mb_s"], rel=0.01, abs=1e-3)
    assert 2**20 <= result["payload_bytes"] < 2**20 + 65536
    assert result["dtype"] == dtype and result["repeat"] == 1
    assert len(done.stdout.strip().splitlines()) == 1 and "MB/s" in done.stdout and str(out) in done.stdout


def test_bench_refuses_bad_arguments(tmp_path):
    args = [sys.executable, str(BENCH), "--mb", "0", "--out", str(tmp_path / "x.json")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--mb" in done.stderr
    assert not (tmp_path / "x.json").exists()
