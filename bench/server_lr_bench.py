"""Server step sweep: does `[aggregation] server_lr` > 1 give the demo's community its holders' skills sooner?

The demo's setting (3 volunteers, one skill each, ffa, the demo's rank, learning rate, batch and
keep_optimizer) run by the quality bench's in-process driver (`quality_bench.run_job`: real
`Volunteer`s, the product's `Round`). One run of R rounds per server step eta; exact match per skill
every `--em-every` rounds, so one 80-round run answers 40, 60 and 80 rounds (a volunteer's learning
rate schedule restarts every round and does not depend on R). Beside each checkpoint: the local-only
adapter of the skill's holder after the same steps, and one trainer on the pooled data for the same
sequential steps (`pooled-same-time`). The demo's bar: the community >= 80% on every skill and
>= its holder's local-only adapter - 10 points.

    python bench/server_lr_bench.py --workers 2                       # eta 1,2,3; 80 rounds; ~15 min
    python bench/server_lr_bench.py --workers 2 --etas 1.5,2 --lr 0.02 --out bench/results/x.json
    python bench/server_lr_bench.py --etas 1 --rounds 90 --lr-schedule cosine --out lr.json

`--lr-schedule` is the project's `[round] lr_schedule` for every run of the sweep (the community, each
holder alone and the pooled trainer: the same project file for all).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import benchlib
import quality_bench as qb

from loracommons.coordinator.config import LR_SCHEDULES

DEFAULT_OUT = benchlib.RESULTS / "server_lr.json"
EM_FLOOR, HOLDER_MARGIN = 0.80, 0.10
"""The demo's bar (issue 12): every skill >= 80%, and >= the holder's local-only adapter - 10 points."""


def jobs_for(etas: list[float], lr: float, s: qb.Settings, plan: dict, work: Path) -> list[dict]:
    common = {"settings": asdict(s), "plan": plan, "work": str(work), "lr": lr}
    jobs = [{**common, "method": "ffa", "server_lr": eta, "base": False} for eta in etas]
    jobs += [{**common, "method": "local-only", "volunteer": i, "base": False}
             for i in range(len(plan["volunteers"]))]
    jobs.append({**common, "method": "pooled-same-time", "base": False})
    return jobs


def run_jobs(jobs: list[dict], workers: int, partial: Path) -> list[dict]:
    """`quality_bench.run_job` on `workers` processes; each finished run is also written to `partial`
    at once (a sweep cut short on a loaded machine keeps what it finished)."""
    done: dict[int, dict] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(qb.run_job, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            benchlib.write_json(partial, {"finished": [done[i] for i in sorted(done)]})
    return [done[i] for i in range(len(jobs))]


def checkpoint(run: dict, r: int) -> dict[str, float] | None:
    row = run["rounds"][r - 1]
    if "exact_match" not in next(iter(row["per_skill"].values())):
        return None
    return {k: v["exact_match"] for k, v in row["per_skill"].items()}


def table(etas: list[float], runs: list[dict], plan: dict, checkpoints: list[int]) -> list[dict]:
    """One row per (rounds, eta): community, holder alone, pooled, per skill, and the demo's bar."""
    fed, local, pooled = runs[: len(etas)], runs[len(etas) : -1], runs[-1]
    rows = []
    for r in checkpoints:
        holder = {}
        for run, volunteer in zip(local, plan["volunteers"], strict=True):
            em = checkpoint(run, r) or {}
            holder.update({k: em[k] for k in volunteer["skills"] if k in em})
        pool = checkpoint(pooled, r)
        for eta, run in zip(etas, fed, strict=True):
            community = checkpoint(run, r)
            if community is None:
                continue
            met = {k: community[k] >= EM_FLOOR and community[k] >= holder.get(k, 0.0) - HOLDER_MARGIN
                   for k in community}
            rows.append({
                "rounds": r, "server_lr": eta, "community": community, "holder_alone": holder,
                "pooled_same_steps": pool, "mean_heldout_loss": run["rounds"][r - 1]["mean_heldout_loss"],
                "bar_met_per_skill": met, "bar_met": all(met.values()),
            })
    return rows


def markdown(rows: list[dict], skills: list[str]) -> str:
    head = "| rounds x 10 | eta | " + " | ".join(f"{k}: community / holder" for k in skills)
    lines = [head + " | pooled (mean) | loss | bar |", "|" + " --- |" * (len(skills) + 5)]
    for row in rows:
        alone = row["holder_alone"]
        cells = [f"{row['community'][k]:.0%} / {alone.get(k, float('nan')):.0%}" for k in skills]
        pool = row["pooled_same_steps"]
        mean_pool = f"{sum(pool.values()) / len(pool):.0%}" if pool else "-"
        bar = "met" if row["bar_met"] else "MISSED"
        lines.append(f"| {row['rounds']} | {row['server_lr']:g} | " + " | ".join(cells)
                     + f" | {mean_pool} | {row['mean_heldout_loss']:.3f} | {bar} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etas", default="1,2,3", help="comma-separated server steps")
    parser.add_argument("--lr", type=float, default=qb.FFA_LR, help="volunteers' peak learning rate")
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--steps", type=int, default=qb.DEMO.steps_per_round)
    parser.add_argument("--em-every", type=int, default=20, help="exact match every k rounds (checkpoints)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                        help="the project's [round] lr_schedule (over --rounds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    etas = [float(x) for x in args.etas.split(",") if x]
    s = qb.Settings(rounds=args.rounds, steps=args.steps, seed=args.seed, em_every=args.em_every,
                    em_local=True, checkpoints_only=True, lr_schedule=args.lr_schedule)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lc-serverlr-") as work:
        plan = benchlib.skill_data(Path(work) / "data", 3, s.n_train, s.n_heldout, s.seed)
        runs = run_jobs(jobs_for(etas, args.lr, s, plan, Path(work)), args.workers,
                        args.out.with_suffix(".partial.json"))
    checkpoints = sorted({r for r in range(args.em_every, args.rounds + 1, args.em_every)} | {args.rounds})
    rows = table(etas, runs, plan, checkpoints)
    report = {
        "bench": "server_lr",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "config": {**asdict(s), "volunteers": 3, "mode": "ffa", "etas": etas, "learning_rate": args.lr,
                   "batch_size": qb.DEMO.batch_size, "lora_r": qb.DEMO.lora_r,
                   "warmup_steps": qb.WARMUP_STEPS, "torch_threads": 1, "workers": args.workers,
                   "bar": {"em_floor": EM_FLOOR, "holder_margin": HOLDER_MARGIN}},
        "table": rows,
        "markdown": markdown(rows, plan["skills"]),
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }
    benchlib.write_json(args.out, report)
    print(report["markdown"])
    print(f"{args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
