"""Quality with a bf16 downlink: `ffa` held-out loss at equal rounds, float32 vs bfloat16 global.

Runs the quality bench's in-process driver (`quality_bench.federate`: real volunteers, the
product's `Round`, the real downlink: B only, packed, deltas against the previous version)
for one community and a short schedule, three ways:

    ffa            payload float32, downlink float32 (the project defaults)
    ffa-bf16       payload bfloat16, downlink float32
    ffa-bf16-down  payload bfloat16, downlink bfloat16 (the global rounded to bf16 each round)

and writes the held-out loss per round and the bytes each volunteer received and sent, as
sent (`bench/results/downlink_quality.json`). comm_bench.py reads it for the measured rows.

    python bench/downlink_quality.py --volunteers 3 --rounds 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import benchlib
import quality_bench as Q

DEFAULT_OUT = benchlib.RESULTS / "downlink_quality.json"
METHODS = (
    Q.BY_NAME["ffa"],
    Q.BY_NAME["ffa-bf16"],
    Q.Method("ffa-bf16-down", "federated", "ffa", Q.FFA_LR, "bfloat16", "bfloat16"),
)
TOLERANCE = 0.02
"""The bf16 downlink's loss counts as no worse within 2% (run-to-run noise of a 10-round run)."""


def run(n: int, s: Q.Settings, work: Path) -> dict:
    started = time.monotonic()
    plan = benchlib.skill_data(work / "data", n, s.n_train, s.n_heldout, s.seed)
    runs = {}
    for method in METHODS:
        Q.BY_NAME.setdefault(method.name, method)  # run_job looks methods up by name
        job = {"settings": asdict(s), "plan": plan, "method": method.name, "work": str(work), "base": False}
        runs[method.name] = Q.run_job(job)
    final = {name: r["rounds"][-1]["mean_heldout_loss"] for name, r in runs.items()}
    bytes_ = {
        name: {
            "down_wire_mean": round(sum(x["bytes_down_wire_per_volunteer"] for x in r["rounds"]) / s.rounds),
            "down_wire_first_round": r["rounds"][0]["bytes_down_wire_per_volunteer"],
            "down_whole_fp32": r["rounds"][0]["bytes_down_per_volunteer"],
            "up_wire_mean": round(sum(x["bytes_up_wire_per_volunteer"] for x in r["rounds"]) / s.rounds),
        }
        for name, r in runs.items()
    }
    limit = final["ffa"] * (1 + TOLERANCE)
    return {
        "bench": "downlink_quality",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "config": {**asdict(s), "volunteers": n, "tolerance": TOLERANCE},
        "runs": runs,
        "final_heldout_loss": final,
        "bytes_per_volunteer_per_round": bytes_,
        "bf16_downlink_no_worse_than_ffa": final["ffa-bf16-down"] <= limit,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Q.Settings()
    parser.add_argument("--volunteers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=d.steps, help="steps per volunteer per round")
    parser.add_argument("--train", type=int, default=d.n_train, help="training examples per volunteer")
    parser.add_argument("--heldout", type=int, default=d.n_heldout, help="held-out examples per skill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    s = Q.Settings(rounds=args.rounds, steps=args.steps, n_train=args.train, n_heldout=args.heldout,
                   seed=args.seed, em_every=0)
    with tempfile.TemporaryDirectory(prefix="lc-downlink-") as work:
        report = run(args.volunteers, s, Path(work))
    benchlib.write_json(args.out, report)
    for name, loss in report["final_heldout_loss"].items():
        b = report["bytes_per_volunteer_per_round"][name]
        print(f"{name:>14}: held-out loss {loss:.4f}, down {b['down_wire_mean']:,} B, "
              f"up {b['up_wire_mean']:,} B", file=sys.stderr)
    print(f"{args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
