"""Sync vs async (FedBuff) on real processes, with one volunteer 5x slower: held-out loss vs wall-clock.

Each run is the demo's community for real (`loracommons.demo.community`): `loracommons coordinator
start` and three `loracommons join` on 127.0.0.1, a release every round (sync) or version (async).
Every volunteer is paced with the documented `join --max-steps-per-second` (fast: --pace; the slow
one: --pace / 5), so that the speeds are what the bench says whatever else loads the machine, as
long as a volunteer's whole task (scoring the adapter it received, training, signing) fits in its
paced time: the cap paces a task from its arrival, so a slow task takes 5x a fast one's. Scenarios:

    slow    volunteers at pace, pace, pace/5   sync ROUNDS rounds; async 2 x ROUNDS versions
    equal   volunteers at pace, pace, pace     sync ROUNDS rounds; async ROUNDS + ROUNDS/2 versions

Async runs as a project of unequal volunteers would set it up: a task has a time budget that a fast
volunteer's steps fit in (`[train] max_minutes`, --task-seconds, default 1.2 x steps / pace): the
slow volunteer then sends a one-step update as often as the others send theirs, instead of a
five-step one five times as rarely. `slow-sync-budget` (reported beside, not a target) is sync with
the same budget: what a sync project gains from it alone.

Every run uses the same volunteer identities (keys derived from --seed): a volunteer's batches are
seeded by its key, so the sync and async runs see the same batches and a re-run repeats them.

Each release is scored afterwards on the demo's held-out sets (`time_to_quality.evaluate_releases`).
Clock: seconds since every volunteer was connected (the bench sees each `join` log's "connected
to" line; start-up, the same for both, is left out). Not the first round's opening: a sync round
opens once its volunteers are there, an async version at once, so that clock would charge async
with the volunteers' connecting (about 3 s). Targets (issue 13): slow: async reaches the sync
run's final held-out loss in <= 0.5x the sync run's wall-clock; equal: at the sync run's final
time, async's latest release is no worse.

    python bench/async_bench.py                      # ~9 min on 2 loaded cores
    python bench/async_bench.py --rounds 2 --steps 2 --out /tmp/async.json    # a smoke test
    python bench/async_bench.py --runs equal-sync,equal-async,slow-async \
        --out bench/results/async_repeat.json --plot /tmp/async_repeat.png   # the repeat (bench/README.md)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import benchlib
from rich.console import Console
from time_to_quality import evaluate_releases

from loracommons.demo.community import Community, DemoError, DemoSettings, _finished

DEFAULT_OUT = benchlib.RESULTS / "async.json"
SLOWDOWN = 5.0


def fixed_identities(folder: Path, volunteers: int, seed: int) -> None:
    """Volunteer keys derived from `seed` where `join --identity` will look for them."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec

    from loracommons.protocol.identity import SigningKey

    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's group order
    for i in range(volunteers):
        secret = int.from_bytes(hashlib.sha256(f"async bench {seed} volunteer {i}".encode()).digest(), "big")
        SigningKey(ec.derive_private_key(secret % (order - 1) + 1, ec.SECP256R1())).save(
            folder / f"volunteer-{i}")


def run_one(settings: DemoSettings, work: Path, label: str, log) -> dict:  # noqa: ANN001
    """One community run: when every volunteer was connected and when each release appeared."""
    community = Community(work, settings, Console(quiet=True))
    fixed_identities(work / "identities", settings.volunteers, settings.seed)
    plan = community.write_data()
    project = community.init_project()
    seen: dict[int, float] = {}
    opened: float | None = None
    connected: float | None = None
    logs = [work / "logs" / f"{v['name']}.log" for v in plan["volunteers"]]
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        community.start(project, plan)
        while True:
            if any(p.poll() is not None for p in community.procs):
                raise DemoError(f"{label}: a process exited early; see {work / 'logs'}")
            rounds = community.api("/api/rounds") or []
            now = time.monotonic()
            if opened is None and rounds:
                opened = now
            if connected is None and all(_says(log, "connected to") for log in logs):
                connected = now
            for release in community.api("/api/releases") or []:
                seen.setdefault(int(release["version"]), now)
            if _finished(rounds, community.api("/api/releases") or [], settings.rounds):
                break
            time.sleep(0.1)
    finally:
        community.stop_all()
    t0 = connected or opened or started
    log(f"{label}: {len(seen)} releases in {time.monotonic() - t0:.0f} s after every volunteer was "
        f"connected (load {os.getloadavg()[0]:.1f})")
    return {"run": label, "schedule": settings.schedule, "rounds": settings.rounds, "paces": settings.paces,
            "startup_s": round(t0 - started, 1),
            "first_round_opened_s": round(opened - t0, 2) if opened is not None else None,
            "release_seen_s": {v: round(t - t0, 2) for v, t in seen.items()}, "plan": plan,
            "project": str(project), "out": str(work), "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "contributions": [{**c, "steps_sent": _steps_sent(log)}
                              for c, log in zip(_contributions(project, plan, work), logs, strict=True)]}


def _steps_sent(path: Path) -> int:
    """The training steps of every update a volunteer's log says it sent."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(int(n) for n in re.findall(r"update sent \((\d+) steps", text))


def _says(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


def _contributions(project: Path, plan: dict, out: Path) -> list[dict]:
    from loracommons.demo.report import contributions

    return contributions(out, plan, project)


def first_time_at_or_below(releases: list[dict], loss: float) -> float | None:
    return next((r["seconds"] for r in releases if r["seconds"] is not None
                 and r["mean_heldout_loss"] <= loss + 1e-9), None)


def latest_at(releases: list[dict], seconds: float) -> dict | None:
    before = [r for r in releases if r["seconds"] is not None and r["seconds"] <= seconds]
    return before[-1] if before else None


def verdicts(runs: dict[str, dict]) -> dict:
    """The issue's two targets, from the scored runs."""
    out: dict = {}
    if "slow-sync" in runs and "slow-async" in runs:
        sync, asyn = runs["slow-sync"]["releases"], runs["slow-async"]["releases"]
        final, t_sync = sync[-1]["mean_heldout_loss"], sync[-1]["seconds"]
        t_async = first_time_at_or_below(asyn, final)
        ratio = None if t_async is None or not t_sync else round(t_async / t_sync, 3)
        out["slow"] = {"sync_final_loss": final, "sync_seconds": t_sync,
                       "async_seconds_to_that_loss": t_async, "ratio": ratio, "target": "<= 0.5",
                       "met": ratio is not None and ratio <= 0.5}
    if "equal-sync" in runs and "equal-async" in runs:
        sync, asyn = runs["equal-sync"]["releases"], runs["equal-async"]["releases"]
        final, t_sync = sync[-1]["mean_heldout_loss"], sync[-1]["seconds"]
        at = latest_at(asyn, t_sync)
        loss = at["mean_heldout_loss"] if at else None
        reached = first_time_at_or_below(asyn, final)
        start = max(sync[0]["seconds"], asyn[0]["seconds"]) if asyn else None
        out["equal"] = {"sync_final_loss": final, "sync_seconds": t_sync, "async_loss_at_that_time": loss,
                        "async_seconds_to_that_loss": reached,
                        # the loss a downloader got, averaged over the sync run's time (from the later
                        # first release): not decided by which run's release came a fraction of a second first
                        "window_s": [start, t_sync] if start is not None else None,
                        "sync_mean_loss_over_run": time_mean(sync, start, t_sync),
                        "async_mean_loss_over_run": time_mean(asyn, start, t_sync),
                        "target": "async <= sync", "met": loss is not None and loss <= final + 1e-9}
    return out


def time_mean(releases: list[dict], start: float | None, end: float) -> float | None:
    """The mean over [start, end] of the latest release's loss (a step function of time)."""
    if start is None or end <= start:
        return None
    points = [(start, latest_at(releases, start))] + [
        (r["seconds"], r) for r in releases if r["seconds"] is not None and start < r["seconds"] <= end]
    if points[0][1] is None:
        return None
    total = sum(r["mean_heldout_loss"] * (t1 - t0)
                for (t0, r), (t1, _) in zip(points, [*points[1:], (end, None)], strict=True))
    return round(total / (end - start), 5)


def run(args: argparse.Namespace, work: Path, log) -> dict:  # noqa: ANN001
    started = time.monotonic()
    base = DemoSettings(volunteers=3, steps_per_round=args.steps, publish_every=1, n_train=args.train,
                        n_heldout=args.heldout, round_timeout_s=600.0, max_staleness=args.max_staleness,
                        staleness_weight=args.staleness_weight, hold_fraction=args.hold_fraction,
                        lr_schedule="constant")  # sync and async on one rate: their versions differ in number
    fast, slow = args.pace, args.pace / SLOWDOWN
    task_seconds = args.task_seconds if args.task_seconds is not None else 1.2 * args.steps / fast
    budget = {"max_minutes": task_seconds / 60 if task_seconds > 0 else 5.0}
    plans = {
        "slow-sync": replace(base, schedule="sync", rounds=args.rounds, paces=(fast, fast, slow)),
        "slow-async": replace(base, schedule="async", rounds=2 * args.rounds, paces=(fast, fast, slow),
                              **budget),
        "equal-sync": replace(base, schedule="sync", rounds=args.rounds, paces=(fast, fast, fast)),
        "equal-async": replace(base, schedule="async", rounds=args.rounds + max(1, args.rounds // 2),
                               paces=(fast, fast, fast), **budget),
        "slow-sync-budget": replace(base, schedule="sync", rounds=args.rounds, paces=(fast, fast, slow),
                                    **budget),
    }
    runs: dict[str, dict] = {}
    for label in args.runs.split(","):
        got = run_one(plans[label], work / label, label, log)
        got["releases"] = evaluate_releases(got, 0)
        log(f"{label}: final held-out loss {got['releases'][-1]['mean_heldout_loss']:.3f}")
        for key in ("plan", "project", "out"):
            got.pop(key)
        runs[label] = got
    return {
        "bench": "async",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "driver": "real processes on 127.0.0.1: `loracommons coordinator start` + three `loracommons join "
        "--max-steps-per-second` (loracommons.demo.community), a release every round or version; each "
        "release scored afterwards on the demo's held-out sets (time_to_quality.evaluate_releases)",
        "config": {**asdict(base), "pace_fast": fast, "pace_slow": slow, "sync_rounds": args.rounds,
                   "task_seconds": task_seconds,
                   "runs": {k: {"schedule": v.schedule, "rounds": v.rounds, "paces": v.paces,
                                "max_minutes": v.max_minutes}
                            for k, v in plans.items()}},
        "runs": runs,
        "verdicts": verdicts(runs),
        "loadavg_end": list(os.getloadavg()),
        "seconds": round(time.monotonic() - started, 1),
    }


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, scenario in zip(axes, ("slow", "equal"), strict=True):
        for i, schedule in enumerate(("sync", "async", "sync-budget")):
            got = report["runs"].get(f"{scenario}-{schedule}")
            if got is None:
                continue
            rows = [r for r in got["releases"] if r["seconds"] is not None]
            unit = "versions" if schedule == "async" else "rounds"
            name = "sync, async's task budget and weights" if schedule == "sync-budget" else schedule
            ax.plot([r["seconds"] for r in rows], [r["mean_heldout_loss"] for r in rows],
                    f"C{i}{':' if schedule == 'sync-budget' else '-'}", marker="o", markersize=3,
                    label=f"{name} ({got['rounds']} {unit})")
        verdict = report["verdicts"].get(scenario)
        if verdict:
            ax.axhline(verdict["sync_final_loss"], color="k", linestyle=":", alpha=0.5,
                       label="sync final loss")
        paces = report["config"]["runs"][f"{scenario}-sync"]["paces"]
        ax.set_title(f"{scenario}: steps/s per volunteer {', '.join(f'{p:g}' for p in paces)}")
        ax.set_xlabel("wall-clock seconds since every volunteer was connected")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean held-out loss of each release")
    fig.suptitle("LoRA Commons: sync rounds vs async buffer (FedBuff), demo community on real processes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="sync rounds (async runs more versions)")
    parser.add_argument("--steps", type=int, default=5, help="local steps per task")
    parser.add_argument("--pace", type=float, default=1.0, help="fast volunteers' steps per second")
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--staleness-weight", default="inverse_sqrt",
                        choices=("inverse_sqrt", "inverse", "constant"), help="[round] staleness_weight")
    parser.add_argument("--hold-fraction", type=float, default=0.5, help="[round] hold_fraction")
    parser.add_argument("--train", type=int, default=DemoSettings.n_train, help="examples per skill")
    parser.add_argument("--heldout", type=int, default=DemoSettings.n_heldout, help="held-out per skill")
    parser.add_argument("--task-seconds", type=float, default=None,
                        help="async runs' task time budget, [train] max_minutes x 60 (default 1.2 x steps / "
                             "pace; 0: none)")
    parser.add_argument("--runs", default="slow-sync,slow-async,equal-sync,equal-async,slow-sync-budget")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or not args.pace > 0:
        parser.error("need --rounds >= 1, --steps >= 1 and --pace > 0")
    with tempfile.TemporaryDirectory(prefix="lc-async-") as work:
        report = run(args, Path(work), _stderr)
    benchlib.write_json(args.out, report)
    png = plot(report, args.plot or args.out.with_name("async.png"))
    print(f"{args.out} {png} ({report['seconds']:.0f} s)")
    for name, verdict in report["verdicts"].items():
        print(f"{name}: {'MET' if verdict['met'] else 'MISSED'} {verdict}")
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
