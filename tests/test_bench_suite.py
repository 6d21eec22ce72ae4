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
        "loss_ratio_equal_sequential_steps",
        "loss_ratio_equal_total_compute",
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
        rows = {(r["mode"], r["dtype"], r["downlink_dtype"]): r for r in res["rows"]}
        assert len(rows) == 18
        assert rows[("fedavg", "float32", "float32")]["up_ratio_to_fp32_ab"] == 1.0
        ffa32 = rows[("ffa", "float32", "float32")]
        assert rows[("ffa", "bfloat16", "float32")]["up_bytes"] < ffa32["up_bytes"]
        assert res["ffa_bf16_up_ratio"] == rows[("ffa", "bfloat16", "bfloat16")]["up_ratio_to_fp32_ab"]
        assert isinstance(res["target_up_ratio_met"], bool)
        # the downlink diet: ffa sends B only, packed; a bf16 downlink halves it again
        ffa, fedavg = rows[("ffa", "float32", "float32")], rows[("fedavg", "float32", "float32")]
        assert ffa["downlink"]["tensors"] == "sent" and fedavg["downlink"]["tensors"] == "all"
        assert ffa["down_wire_bytes"] < 0.6 * ffa["down_whole_bytes"]
        assert rows[("ffa", "float32", "bfloat16")]["down_wire_bytes"] < 0.6 * ffa["down_wire_bytes"]
        assert res["round_trip_target_met"] == (res["ffa_bf16_round_trip_ratio"] <= 0.25)
    measured = report["measured_in_quality_run"]["2"]
    table = {(r["mode"], r["dtype"]): r for r in report["models"]["demo"]["rows"]
             if r["downlink_dtype"] == "float32"}
    # the table's sizes are those of the quality run's real envelopes, within a few manifest bytes
    assert abs(measured["ffa"]["up_bytes"] - table[("ffa", "float32")]["up_bytes"]) < 64
    assert abs(measured["ffa-bf16"]["up_bytes"] - table[("ffa", "bfloat16")]["up_bytes"]) < 64
    equal = report["quality_at_equal_bytes"]["2"]
    assert len(equal["at_equal_upload_bytes"]) == 2 and isinstance(
        equal["ffa_bf16_no_worse_than_fedavg_fp32"], bool
    )


@pytest.mark.slow  # real processes, ~45 s: out of the default run, like the long fault trials
def test_time_to_quality_tiny(tmp_path):
    """Real processes (coordinator + 2 joins), one 2x2 schedule: every release scored, references beside."""
    out = tmp_path / "ttq.json"
    run("time_to_quality.py", "--tiny", "--out", str(out), timeout=400)
    report = json.loads(out.read_text())
    assert report["bench"] == "time_to_quality" and report["config"]["publish_every"] == 1
    (only,) = report["runs"]
    assert only["schedule"] == "2x2" and [r["round"] for r in only["releases"]] == [1, 2]
    seen = [r["seconds"] for r in only["releases"]]
    assert all(s is not None and s > 0 for s in seen) and seen == sorted(seen)
    for row in only["releases"]:
        assert row["mean_heldout_loss"] > 0 and 0 <= row["mean_exact_match"] <= 1
    assert set(report["references"]) == {"pooled-same-time", "centralized"}
    refs = report["references"]
    assert refs["centralized"]["steps"] == 2 * refs["pooled-same-time"]["steps"]
    assert (tmp_path / "time_to_quality.png").stat().st_size > 1000


@pytest.mark.slow  # plain Flower and LoRA Commons communities on real processes, ~70 s
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
        "downlink_quality.py",
        "comm_bench.py",
        "aggregate_bench.py",
        "overhead_bench.py",
        "time_to_quality.py",
        "async_bench.py",
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
    check_targets(text, results)


def test_committed_readme_is_rendered_from_the_committed_results(tmp_path):
    out = tmp_path / "README.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "make_readme.py"), "--results", str(BENCH / "results"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (BENCH / "README.md").read_text(), "bench/README.md is stale: run make_readme"


def test_committed_readme_marks_agree_with_the_results():
    check_targets((BENCH / "README.md").read_text(), BENCH / "results")


def test_check_targets_catches_a_wrong_mark():
    text = (BENCH / "README.md").read_text()
    for old, new in (("**met**", "**MISSED**"), ("**MISSED**", "**met**"), ("**met**", "met"),
                     ("**met**", "**met** **MISSED**")):
        wrong = text.replace(f"| {old} |", f"| {new} |", 1)
        assert wrong != text
        with pytest.raises(AssertionError, match="is marked"):
            check_targets(wrong, BENCH / "results")


# ---------------------------------------------------------------- targets, recomputed from the raw numbers

MARKS = {"**met**": True, "**MISSED**": False}


def _quality_checks(q: dict, n: str, mode: str) -> tuple[float, float, float, float, float]:
    """(loss, em, best centralized loss, best local-only em, fedavg loss) of one community size."""
    s = q["results"][n]["summary"]
    central = min(s["final"][k]["mean_heldout_loss"] for k in ("centralized-ffa", "centralized-full"))
    best_local = max(row["mean_exact_match"] for row in s["local_only"].values())
    final = s["final"][mode]
    return (final["mean_heldout_loss"], final["mean_exact_match"], central, best_local,
            s["final"]["fedavg"]["mean_heldout_loss"])


def _equal_sequential(r: dict, n: str, mode: str, ratio: str) -> bool:
    final = r["quality"]["results"][n]["summary"]["final"]
    return final[mode]["mean_heldout_loss"] <= float(ratio) * final["pooled-same-time"]["mean_heldout_loss"]


def _equal_compute(r: dict, n: str, mode: str, ratio: str) -> bool:
    loss, _, central, _, _ = _quality_checks(r["quality"], n, mode)
    return loss <= float(ratio) * central


def _above_local(r: dict, n: str, mode: str) -> bool:
    _, em, _, best_local, _ = _quality_checks(r["quality"], n, mode)
    return em > best_local


def _vs_fedavg(r: dict, n: str, mode: str) -> bool:
    loss, _, _, _, fedavg = _quality_checks(r["quality"], n, mode)
    return loss <= fedavg


def _comm_measured(r: dict, n: str) -> bool:
    return r["comm"]["measured_in_quality_run"][n]["ffa-bf16"]["up_wire_ratio_to_fp32_ab"] <= 0.25


def _comm_model(r: dict, model: str) -> bool:
    rows = {(row["mode"], row["dtype"]): row for row in r["comm"]["models"][model]["rows"]}
    return rows[("ffa", "bfloat16")]["up_wire_ratio_to_fp32_ab"] <= 0.25


def _comm_trip_model(r: dict, model: str) -> bool:
    rows = {(row["mode"], row["dtype"], row["downlink_dtype"]): row
            for row in r["comm"]["models"][model]["rows"]}
    return rows[("ffa", "bfloat16", "bfloat16")]["round_trip_ratio_to_fp32_ab"] <= 0.25


def _comm_trip_measured(r: dict, n: str) -> bool:
    down = r["comm"]["measured_downlink"]
    assert str(down["volunteers"]) == n
    return down["runs"]["ffa-bf16-down"]["round_trip_ratio_to_fp32_ab"] <= 0.25


def _downlink_quality(r: dict, n: str) -> bool:
    final = r["downlink_quality"]["final_heldout_loss"]
    assert str(r["downlink_quality"]["config"]["volunteers"]) == n
    return final["ffa-bf16-down"] <= final["ffa"] * (1 + r["downlink_quality"]["config"]["tolerance"])


def _comm_equal_rounds(r: dict, n: str) -> bool:
    last = r["comm"]["quality_at_equal_bytes"][n]["final_loss_equal_rounds"]
    return last["ffa-bf16"] <= last["fedavg"]


def _throughput(r: dict, variant: str) -> bool:
    rows = [row for row in r["aggregate"]["results"] if row["variant"] == variant]
    return bool(rows) and all(row["admit_aggregate_mb_s"] >= 0.5 * row["sha256_mb_s"] for row in rows)


def _memory(r: dict, variant: str) -> bool:
    return r["aggregate"]["memory_ratio_largest_to_smallest_n"][variant] <= 1.2


def _overhead(r: dict, limits: str) -> bool:
    o = r["overhead"]
    idle, ratio = o["loracommons"]["summary"]["mean_overhead_s"], o["ratio_steady_overhead"]
    ok = ratio is not None and ratio <= o["target"]["ratio_at_most"]
    if "overhead_s_at_most" in o["target"]:
        assert f"<= {o['target']['overhead_s_at_most']} s per round" in limits, "the idle target is not shown"
        ok = ok and idle <= o["target"]["overhead_s_at_most"]
    return ok and f"<= {o['target']['ratio_at_most']}" in limits


def _async_pairs(r: dict, scenario: str) -> list[tuple[list[dict], list[dict]]]:
    """(sync, async) releases of the recorded run and of its repeat, when there is one: the repeat's
    own sync run where it has one, else the recorded one (sync repeats bit for bit)."""
    runs = r["async"]["runs"]
    pairs = [(runs[f"{scenario}-sync"]["releases"], runs[f"{scenario}-async"]["releases"])]
    again = (r.get("async_repeat") or {}).get("runs", {})
    if f"{scenario}-async" in again:
        sync = again.get(f"{scenario}-sync", runs[f"{scenario}-sync"])["releases"]
        pairs.append((sync, again[f"{scenario}-async"]["releases"]))
    return pairs


def _async_slow(r: dict) -> bool:
    def met(sync: list[dict], asyn: list[dict]) -> bool:
        final, seconds = sync[-1]["mean_heldout_loss"], sync[-1]["seconds"]
        return any(x["seconds"] <= 0.5 * seconds and x["mean_heldout_loss"] <= final + 1e-9 for x in asyn)

    return all(met(*pair) for pair in _async_pairs(r, "slow"))


def _async_equal(r: dict) -> bool:
    def met(sync: list[dict], asyn: list[dict]) -> bool:
        final, seconds = sync[-1]["mean_heldout_loss"], sync[-1]["seconds"]
        before = [x for x in asyn if x["seconds"] <= seconds]
        return bool(before) and before[-1]["mean_heldout_loss"] <= final + 1e-9

    return all(met(*pair) for pair in _async_pairs(r, "equal"))


def _ranks_final(r: dict) -> dict[str, float]:
    return {name: row["mean_heldout_loss"] for name, row in r["quality_ranks"]["final"].items()}


def _ranks_within(r: dict, top: str) -> bool:
    loss = _ranks_final(r)
    return loss["mixed"] <= 1.1 * loss[f"all-{top}"]


def _ranks_better(r: dict, top: str) -> bool:
    loss = _ranks_final(r)
    return loss["mixed"] < loss[f"two-{top}"]


def _kept_final(r: dict, n: str, mode: str) -> tuple[float, float, float, dict]:
    q = r["quality_keep_30x10"]
    final = q["results"][n]["summary"]["final"]
    central = min(final[k]["mean_heldout_loss"]
                  for k in ("centralized-ffa", "centralized-full") if k in final)
    return (final[mode]["mean_heldout_loss"], final["pooled-same-time"]["mean_heldout_loss"], central,
            q["config"]["target_ratios"])


def _kept_sequential(r: dict, n: str, mode: str) -> bool:
    loss, seq, _, ratios = _kept_final(r, n, mode)
    return loss <= ratios["equal_sequential_steps"] * seq


def _kept_compute(r: dict, n: str, mode: str) -> bool:
    loss, _, central, ratios = _kept_final(r, n, mode)
    return loss <= ratios["equal_total_compute"] * central


RULES = [
    (r"quality, (\d+) volunteers, `(\w+)`, equal sequential steps \(pooled trainer \d+ a round\), "
     r"\d+ x \d+, optimizer kept", _kept_sequential),
    (r"quality, (\d+) volunteers, `(\w+)`, equal total compute \(pooled trainer N x \d+ a round\), "
     r"\d+ x \d+, optimizer kept", _kept_compute),
    (r"quality, (\d+) volunteers, `(\w+)` held-out loss <= ([\d.]+) x centralized at equal sequential steps",
     _equal_sequential),
    (r"quality, (\d+) volunteers, `(\w+)` held-out loss <= ([\d.]+) x centralized at equal total compute",
     _equal_compute),
    (r"quality, (\d+) volunteers, `(\w+)` above every local-only adapter on mean exact match", _above_local),
    (r"quality, (\d+) volunteers, `(\w+)` not worse than `fedavg` at equal rounds", _vs_fedavg),
    (r"comm, demo adapter, (\d+) volunteers, trained updates: `ffa` bf16 upload as sent <= 0.25",
     _comm_measured),
    (r"comm, ([\w.-]+) \(Gaussian stand-in values\): `ffa` bf16 upload as sent <= 0.25", _comm_model),
    (r"comm, (\d+) volunteers: `ffa` bf16 no worse held-out loss than `fedavg` fp32", _comm_equal_rounds),
    (r"comm, ([\w.-]+) \(Gaussian stand-in values\): `ffa` round trip as sent, bf16 up and bf16 down, "
     r"<= 0.25", _comm_trip_model),
    (r"comm, demo adapter, (\d+) volunteers, trained rounds: `ffa` round trip as sent, bf16 up and bf16 "
     r"down, <= 0.25", _comm_trip_measured),
    (r"comm, (\d+) volunteers: `ffa` with a bf16 downlink no worse held-out loss than `ffa` fp32",
     _downlink_quality),
    (r"coordinator `(\w+)`: admission\+aggregation >= 0.5 x sha256 throughput", _throughput),
    (r"coordinator `(\w+)`: peak memory N=\d+ within 1.2x of N=\d+", _memory),
    (r"round overhead, (.*LoRA Commons / plain Flower <= [\d.]+)$", _overhead),
    (r"async, one volunteer 5x slower: reaches the sync run's final held-out loss in <= 0.5 x", _async_slow),
    (r"async, equal speeds: held-out loss no worse than sync at the sync run's final time", _async_equal),
    (r"quality, ranks \{[\d, ]+\}: held-out loss within 10% of all (\d+)", _ranks_within),
    (r"quality, ranks \{[\d, ]+\}: better than the two rank-(\d+) volunteers alone", _ranks_better),
]


def _expected_rows(r: dict) -> int:
    """How many target rows the results imply (so that none can silently go missing)."""
    q, c, a, o = (r.get(k) for k in ("quality", "comm", "aggregate", "overhead"))
    count = 8 * len(q["results"]) if q else 0
    if c:
        measured = c.get("measured_in_quality_run", {}).values()
        count += sum("up_wire_ratio_to_fp32_ab" in m.get("ffa-bf16", {}) for m in measured)
        count += 2 * len(c["models"]) + len(c.get("quality_at_equal_bytes", {}))
        count += 2 if c.get("measured_downlink") else 0
    count += 2 * len(a["variants"]) if a else 0
    count += len(r["async"]["verdicts"]) if r.get("async") else 0
    count += 2 if r.get("quality_ranks") else 0
    kept = r.get("quality_keep_30x10")
    count += 2 * sum(len(res["summary"]["checks"]) for res in kept["results"].values()) if kept else 0
    return count + (1 if o else 0)


def check_targets(readme: str, results_dir: Path) -> None:
    """Every target row is marked exactly met or MISSED, as the raw numbers in the results decide."""
    import re

    r = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("*.json")}
    section = readme.split("## Targets", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    rows = [line.strip("|").split(" | ") for line in lines[2:]]  # past the header and its rule
    assert len(rows) == _expected_rows(r), f"{len(rows)} target rows, the results imply {_expected_rows(r)}"
    for target, _measured, mark in ((c.strip() for c in row) for row in rows):
        assert mark in MARKS, f"target {target!r} is marked {mark!r}, not exactly **met** or **MISSED**"
        matched = [(rule, m.groups()) for pattern, rule in RULES if (m := re.match(pattern, target))]
        assert len(matched) == 1, f"target {target!r}: {len(matched)} rules in this test know it"
        rule, args = matched[0]
        assert MARKS[mark] == rule(r, *args), f"target {target!r} is marked {mark} against the numbers"


@pytest.fixture(scope="module")
def quality_ranks(tmp_path_factory) -> Path:
    """One tiny run of the nested-ranks bench, shared: the rerun test compares against it."""
    out = tmp_path_factory.mktemp("quality_ranks") / "quality_ranks.json"
    run("quality_ranks.py", "--tiny", "--compare", "--out", str(out), timeout=600)
    return out


def test_quality_ranks_tiny(quality_ranks):
    """The nested-ranks bench: three communities run, the mixed one's volunteers train at their ranks."""
    report = json.loads(quality_ranks.read_text())
    assert report["bench"] == "quality_ranks" and set(report["final"]) == {"mixed", "all-16", "two-16"}
    # --compare: the mixed community under every nested_weighting, the default's the checked one
    weightings, default = report["weightings"], report["config"]["nested_weighting"]
    assert set(weightings) == {"trained", "rank", "mass"} and default == "rank"
    assert weightings[default]["mean_heldout_loss"] == report["checks"]["mixed_heldout_loss"]
    assert report["final"]["mixed"]["ranks"] == [4, 4, 8, 8, 16, 16]
    assert report["final"]["two-16"]["ranks"] == [16, 16]
    checks = report["checks"]
    assert checks["met"] == (checks["within_10pct_of_all_16"] and checks["better_than_two_16"])
    assert all(len(curve) == report["config"]["rounds"] for curve in report["curves"].values())


def test_quality_ranks_reruns_one_community_against_an_earlier_result(quality_ranks, tmp_path):
    """`--only mixed --reuse`: the mixed community run again (the same numbers: the run is deterministic),
    the others taken from the earlier result and said so."""
    first, again = quality_ranks, tmp_path / "again.json"
    run("quality_ranks.py", "--tiny", "--only", "mixed", "--reuse", str(first), "--out", str(again),
        timeout=600)
    before, after = json.loads(first.read_text()), json.loads(again.read_text())
    assert list(after["final"]) == ["mixed", "all-16", "two-16"]
    assert after["curves"] == before["curves"]
    assert after["config"]["reused"] == {"file": str(first), "date": before["date"],
                                         "communities": ["all-16", "two-16"]}
