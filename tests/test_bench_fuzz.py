"""Smoke test of bench/fuzz_parsers.py: the real script for ~3 s, its JSON, and the regression it found."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from loracommons.protocol.codec import decode_tensors
from loracommons.protocol.errors import BadTensor

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fuzz_parsers.py"
TARGETS = {"envelope", "codec", "release", "manifest"}


def test_fuzz_runs_bounded_and_writes_its_json(tmp_path):
    out = tmp_path / "results" / "fuzz.json"
    done = subprocess.run([sys.executable, str(BENCH), "--seconds", "3", "--seed", "7", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["ok"], result["escapes"][:3]
    assert set(result["targets"]) == TARGETS
    for name, counts in result["targets"].items():
        assert counts["examples"] > 0 and counts["escapes"] == 0, name
        assert counts["protocol_errors"] + counts["accepted"] == counts["examples"], name
        assert counts["protocol_errors"] > 0, name  # the mutants do reach the parsers' refusals
    assert result["examples"] == sum(c["examples"] for c in result["targets"].values())
    assert 3 <= result["seconds"] < 60 and result["escapes"] == []
    assert {"platform", "cpu_count", "python", "hypothesis"} <= set(result["machine"])
    assert len(done.stdout.strip().splitlines()) == 1 and str(out) in done.stdout


def test_fuzz_refuses_bad_arguments(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--seconds", "0", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--seconds" in done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32, None])
def test_safetensors_dtype_of_another_json_type_is_a_bad_tensor(dtype):
    """Found by the fuzzer: an unhashable dtype used to escape decode_tensors as TypeError."""
    header = json.dumps({"t": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(BadTensor, match="dtype"):
        decode_tensors(struct.pack("<Q", len(header)) + header + b"\0" * 4, max_bytes=1 << 20)
