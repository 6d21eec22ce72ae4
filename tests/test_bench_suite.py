"""The issue-6 bench scripts run end to end on tiny sizes and write the JSON they promise.

No timing is asserted: only that each script finishes, and that its JSON has the keys
and the internal consistency bench/README.md is generated from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def quality(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    run("quality_bench.py", "--tiny", "--out", str(out))
    return json.loads(out.read_text()), out


def test_quality_bench_tiny(quality):
    report, out = quality
    assert report["bench"] == "quality" and {
        "date",
        "machine",
        "config",
        "driver",
        "exactness",
        "targets",
    } <= set(report)
    assert {"cpu_model", "cpu_count", "python", "torch"} <= set(report["machine"])
    assert (out.parent / "quality_curves.png").stat().st_size > 1000
    res = report["results"]["2"]
    rounds = report["config"]["rounds"]
    assert set(res["runs"]) == {
        "centralized-ffa",
        "centralized-full",
        "pooled-same-time",
        "ffa",
        "exact",
        "fedavg",
        "ffa-bf16",
    }
    assert len(res["local_runs"]) == 2
    skills = res["summary"]["skills"]
    assert skills == ["reverse", "vowels"]  # one skill per volunteer, the demo's first two
    for name, run_ in res["runs"].items():
        assert len(run_["rounds"]) == rounds
        last = run_["rounds"][-1]
        assert set(last["per_skill"]) == set(skills) and 0 <= last["mean_exact_match"] <= 1
        assert last["mean_heldout_loss"] > 0
        if name in ("ffa", "exact", "fedavg", "ffa-bf16"):
            assert {"rel_frobenius_error", "best_rank_r_rel_error"} <= set(last["exactness"])
            assert last["bytes_up_per_volunteer"] > 0 and last["bytes_down_per_volunteer"] > 0
    # the federation is trained by the project's code: same steps for everyone, centralized N x steps
    assert res["runs"]["centralized-ffa"]["steps_per_round"] == 2 * res["runs"]["ffa"]["steps_per_round"]
    # ffa's mean of B is exact; bf16 halves the upload
    assert report["exactness"]["ffa"]["2"]["max_rel_frobenius_error"] < 1e-5
    up = {n: res["runs"][n]["rounds"][0]["bytes_up_per_volunteer"] for n in ("ffa", "ffa-bf16", "fedavg")}
    assert up["ffa-bf16"] < up["ffa"] < up["fedavg"]
    checks = res["summary"]["checks"]
    assert set(checks) == {"ffa", "exact"} and isinstance(res["summary"]["target_met"], bool)
    assert {
        "within_10pct_of_centralized",
        "above_every_local_on_mean_exact_match",
        "not_worse_than_fedavg",
        "all_met",
    } <= set(checks["ffa"])
    assert set(res["summary"]["curves"]) == {*res["runs"], "local-only (mean)"}


def test_comm_bench_with_quality(quality, tmp_path):
    _, quality_path = quality
    out = tmp_path / "comm.json"
    run(
        "comm_bench.py", "--models", "demo,llama-3.2-1b-qv", "--quality", str(quality_path), "--out", str(out)
    )
    report = json.loads(out.read_text())
    assert (tmp_path / "comm_bars.png").stat().st_size > 1000
    assert set(report["models"]) == {"demo", "llama-3.2-1b-qv"}
    for res in report["models"].values():
        rows = {(r["mode"], r["dtype"]): r for r in res["rows"]}
        assert len(rows) == 9
        assert rows[("fedavg", "float32")]["up_ratio_to_fp32_ab"] == 1.0
        assert rows[("ffa", "bfloat16")]["up_bytes"] < rows[("ffa", "float32")]["up_bytes"]
        assert res["ffa_bf16_up_ratio"] == rows[("ffa", "bfloat16")]["up_ratio_to_fp32_ab"]
        assert isinstance(res["target_up_ratio_met"], bool)
    measured = report["measured_in_quality_run"]["2"]
    table = {(r["mode"], r["dtype"]): r for r in report["models"]["demo"]["rows"]}
    # the table's sizes are those of the quality run's real envelopes, within a few manifest bytes
    assert abs(measured["ffa"]["up_bytes"] - table[("ffa", "float32")]["up_bytes"]) < 64
    assert abs(measured["ffa-bf16"]["up_bytes"] - table[("ffa", "bfloat16")]["up_bytes"]) < 64
    equal = report["quality_at_equal_bytes"]["2"]
    assert len(equal["at_equal_upload_bytes"]) == 2 and isinstance(
        equal["ffa_bf16_no_worse_than_fedavg_fp32"], bool
    )


def test_overhead_bench_one_round(tmp_path):
    out, work = tmp_path / "overhead.json", tmp_path / "work"
    args = ["--rounds", "1", "--steps", "1", "--timeout", "180", "--work-dir", str(work), "--out", str(out)]
    run("overhead_bench.py", *args, timeout=400)
    report = json.loads(out.read_text())
    assert {"loracommons", "plain_flower", "ratio_steady_overhead", "target", "machine", "date"} <= set(
        report
    )
    for side in ("loracommons", "plain_flower"):
        rows = report[side]["rounds"]
        assert [r["round"] for r in rows] == [1] and rows[0]["wall_s"] > 0
        assert {"mean_overhead_s", "first_round_overhead_s"} <= set(report[side]["summary"])
    assert report["loracommons"]["rounds"][0]["volunteers_reporting"] == 2
    assert report["ratio_steady_overhead"] > 0
    assert (work / "lc" / "logs" / "coordinator.log").exists()
    assert (work / "plain" / "logs" / "superlink.log").exists()
    # nothing the bench started keeps running: each process led its own session (group)
    started = {str(p["pid"]) for side in ("loracommons", "plain_flower") for p in report[side]["processes"]}
    assert len(started) == 7  # coordinator + 2 joins; superlink + 2 supernodes + flwr run
    assert not _live_groups(started)


def _live_groups(groups: set[str], wait_s: float = 10.0) -> set[str]:
    """Those of `groups` that still have a running process (zombies awaiting their reaper excluded)."""
    deadline = time.monotonic() + wait_s
    while True:
        ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
        live = {pgid for pgid, stat in (line.split() for line in ps.splitlines()) if not stat.startswith("Z")}
        left = groups & live
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_run_all_lists_every_bench():
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all"), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for script in (
        "quality_bench.py",
        "comm_bench.py",
        "aggregate_bench.py",
        "overhead_bench.py",
        "trainer_bench.py",
        "protocol_bench.py",
    ):
        assert script in done.stdout


def test_readme_renders_from_results(quality, tmp_path):
    report, _ = quality
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality.json").write_text(json.dumps(report))
    out = tmp_path / "README.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "make_readme.py"), "--results", str(results), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "## Targets" in text and "## Quality" in text and "2 volunteers" in text
    assert "met**" in text or "MISSED" in text
