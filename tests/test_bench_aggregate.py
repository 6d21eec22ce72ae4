"""bench/aggregate_bench.py runs end to end on tiny shapes and writes the promised JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "variant",
    "n",
    "payload_mb_total",
    "payload_mb_each",
    "admission_s",
    "aggregation_s",
    "admit_aggregate_mb_s",
    "admission_mb_s",
    "sha256_mb_s",
    "peak_mem_mb",
    "buffers_updates",
    "metrics",
}


def test_bench_writes_throughput_and_memory_per_n(tmp_path):
    out = tmp_path / "aggregate.json"
    variants = ["ffa", "exact", "ffa+clip+spill"]
    proc = subprocess.run(
        [
            sys.executable,
            "bench/aggregate_bench.py",
            "--model",
            "tiny",
            "--sizes",
            "3,5",
            "--modes",
            ",".join(variants),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    report = json.loads(out.read_text())
    assert report["bench"] == "aggregate" and report["model"] == "tiny" and report["sizes"] == [3, 5]
    assert set(report["memory_ratio_largest_to_smallest_n"]) == set(variants)
    rows = report["results"]
    assert [(r["variant"], r["n"]) for r in rows] == [(v, n) for v in variants for n in (3, 5)]
    for row in rows:
        assert set(row) - {"exact_check"} == ROW_KEYS
        assert row["admit_aggregate_mb_s"] > 0 and row["sha256_mb_s"] > 0 and row["peak_mem_mb"] >= 0
        assert row["metrics"]["aggregated"] == row["n"]
        assert row["buffers_updates"] == ("clip" in row["variant"])
    assert "exact_truncation_bound" in rows[2]["metrics"]
    check = rows[2]["exact_check"]
    assert check["rel_dist_to_best_rank_r"] < 1e-4  # what the rank-4r sketch drops barely touches the top r
    assert len(proc.stderr.strip().splitlines()) == len(rows)
