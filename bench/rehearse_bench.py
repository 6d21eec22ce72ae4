"""Rehearsals at scale: wall-clock per round and coordinator memory at N virtual volunteers,
and the project's default robust settings against 20% hostile volunteers (next to the same
attack on plain settings: an allowlist project's, no clipping and a cap of 10,000 examples).

Each rehearsal is `loracommons coordinator rehearse` in its own process (so each peak RSS
is its own), on a fresh `coordinator init` project of the demo model with the demo skill
data split iid; every sampled volunteer trains `--steps` local steps a round.

    python bench/rehearse_bench.py scale --sizes 20,50,200 --rounds 3 --steps 2
    python bench/rehearse_bench.py hostile --volunteers 20 --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

HOSTILE = "0.2:model_replacement,weight_inflation"
RECORDS_EACH = 50
"""Records per volunteer in the scale runs (5 demo skills, iid)."""


def workspace(root: Path, n_train: int) -> tuple[Path, Path]:
    """Demo skill data: (folder of train files, one held-out file of every skill)."""
    from loracommons.demo.skills import NEW_SKILLS, write_skill_files

    root.mkdir(parents=True, exist_ok=True)
    paths = write_skill_files(root / "all", NEW_SKILLS, n_train=n_train, n_heldout=40, seed=0)
    train = root / "train"
    train.mkdir()
    heldout = root / "heldout.jsonl"
    with heldout.open("w") as out:
        for path in paths:
            if ".train." in path.name:
                shutil.move(str(path), train / path.name)
            else:
                out.write(path.read_text())
    return train, heldout


def rehearse(root: Path, name: str, args: list[str], membership: str = "open") -> dict:
    """One fresh project, one rehearsal of it; its report with the process's wall-clock."""
    project = root / name
    cli = [sys.executable, "-m", "loracommons", "coordinator"]
    subprocess.run([*cli, "init", str(project), "--base-model", "loracommons/demo-tiny",
                    "--membership", membership], check=True, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    done = subprocess.run([*cli, "rehearse", str(project), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"rehearsal {name} failed:\n{done.stderr[-3000:]}")
    report = json.loads(next((project / "rehearsals").glob("*/report.json")).read_text())
    report["process_seconds"] = round(time.monotonic() - started, 1)
    return report


def summary(report: dict) -> dict:
    rounds = report["rounds"]
    return {
        "volunteers": report["volunteers"],
        "round_seconds": [r.get("seconds") for r in rounds],
        "coordinator_rss_mb_per_round": [r.get("coordinator_rss_mb") for r in rounds],
        "coordinator_peak_rss_mb": report["coordinator_peak_rss_mb"],
        "admitted": [r["admitted"] for r in rounds],
        "rejected": [r["rejected"] for r in rounds],
        "bytes_in": [r["bytes"] for r in rounds],
        "process_seconds": report["process_seconds"],
        "heldout": report.get("heldout"),
    }


def scale(root: Path, ns: argparse.Namespace) -> dict:
    sizes = [int(s) for s in ns.sizes.split(",")]
    runs = []
    for n in sizes:
        # the same work per volunteer at every N: RECORDS_EACH records each (10% held out, scored)
        train, heldout = workspace(root / f"data-{n}", n_train=RECORDS_EACH * n // 5)
        report = rehearse(root, f"scale-{n}", [
            "--volunteers", str(n), "--per-round", str(n), "--data", str(train), "--rounds", str(ns.rounds),
            "--steps", str(ns.steps), "--heldout", str(heldout)])
        runs.append(summary(report))
        print(json.dumps(runs[-1]), flush=True)
    base = runs[0]
    for run in runs:
        ratio = run["coordinator_peak_rss_mb"] / base["coordinator_peak_rss_mb"]
        run["peak_rss_vs_smallest"] = round(ratio, 3)
        steady = [s for s in run["round_seconds"][1:] if s] or run["round_seconds"]
        run["seconds_per_round_after_first"] = round(sum(steady) / len(steady), 2)
        run["seconds_per_volunteer"] = round(run["seconds_per_round_after_first"] / run["volunteers"], 3)
    return {"sizes": sizes, "rounds": ns.rounds, "steps": ns.steps, "records_per_volunteer": RECORDS_EACH,
            "runs": runs}


def hostile(root: Path, ns: argparse.Namespace) -> dict:
    n = ns.volunteers
    train, heldout = workspace(root, n_train=max(40, 4 * n))
    common = ["--volunteers", str(n), "--per-round", str(n), "--data", str(train), "--rounds",
              str(ns.rounds), "--steps", str(ns.steps), "--heldout", str(heldout)]
    honest = rehearse(root, "honest", common)
    attacked = rehearse(root, "hostile", [*common, "--hostile", HOSTILE])
    # The same attack on plain settings (what an allowlist project keeps: no clipping, cap 10,000).
    undefended = rehearse(root, "undefended", [*common, "--hostile", HOSTILE], membership="allowlist")
    h, a = honest["heldout"]["final"], attacked["heldout"]["final"]
    return {"volunteers": n, "rounds": ns.rounds, "steps": ns.steps, "hostile": HOSTILE,
            "honest": summary(honest), "attacked": summary(attacked),
            "flagged": attacked["flagged"], "heldout_initial": honest["heldout"]["initial"],
            "heldout_honest": h, "heldout_attacked": a, "relative_gap": round((a - h) / h, 4),
            "within_10_percent": abs(a - h) <= 0.1 * h,
            "undefended": summary(undefended), "heldout_undefended": undefended["heldout"]["final"],
            "flagged_undefended": undefended["flagged"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("scale", "hostile"))
    parser.add_argument("--sizes", default="20,50,200")
    parser.add_argument("--volunteers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rehearse-bench-") as tmp:
        result = (scale if ns.what == "scale" else hostile)(Path(tmp), ns)
    out = ns.out or benchlib.RESULTS / f"rehearse_{ns.what}.json"
    benchlib.write_json(out, {"bench": f"rehearse_{ns.what}", "when": benchlib.now(),
                              "machine": benchlib.machine_info(), **result})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
