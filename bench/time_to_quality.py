"""Time to quality on real processes: held-out loss and exact match of every release against wall-clock.

For each schedule (rounds x local steps, equal total compute: e.g. 10x30, 30x10, 60x5,
90x3) it runs the demo's community for real: `loracommons coordinator start` and one
`loracommons join` per volunteer on 127.0.0.1, with the demo's data, base and settings
(`loracommons.demo.community`), publishing a release every round. While it runs, the
bench polls the coordinator's `/api/releases` and notes when each release appears
(seconds since the processes were spawned: start-up included). After the run it reads
each release's adapter from the project store and scores it with the demo's own
evaluation (`loracommons.demo.report`), so the curves use the demo's held-out sets.

Beside the curves, two references trained by the demo's reference trainer on the pooled
data (every volunteer's file in one): `pooled-same-time` (as many steps as one volunteer
makes: its sequential steps, so its wall-clock) and `centralized` (volunteers x that: the
same total compute). Their seconds are one process's training plus scoring.

    python bench/time_to_quality.py                         # 10x30,30x10,60x5,90x3: ~15 min on 2 cores
    python bench/time_to_quality.py --tiny --out /tmp/ttq.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import benchlib
from rich.console import Console

from loracommons.demo.community import Community, DemoError, DemoSettings, _finished

DEFAULT_OUT = benchlib.RESULTS / "time_to_quality.json"
DEFAULT_SCHEDULES = "10x30,30x10,60x5,90x3"


@dataclass(frozen=True)
class Schedule:
    rounds: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.rounds}x{self.steps}"

    @classmethod
    def parse(cls, text: str) -> Schedule:
        rounds, _, steps = text.partition("x")
        return cls(int(rounds), int(steps))


def run_schedule(schedule: Schedule, base: DemoSettings, work: Path, log) -> dict:  # noqa: ANN001
    """One community run; when each release appeared, and the project folder to read them from."""
    settings = replace(base, rounds=schedule.rounds, steps_per_round=schedule.steps, publish_every=1)
    community = Community(work, settings, Console(quiet=True))
    plan = community.write_data()
    project = community.init_project()
    seen: dict[int, float] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        coordinator = community.start(project, plan)
        while True:
            if any(p.poll() is not None for p in community.procs):
                raise DemoError(f"{schedule.label}: a process exited early; see {work / 'logs'}")
            releases = community.api("/api/releases") or []
            now = time.monotonic() - started
            for release in releases:
                seen.setdefault(int(release["version"]), round(now, 2))
            if _finished(community.api("/api/rounds") or [], releases, settings.rounds):
                break
            time.sleep(0.1)
        del coordinator
    finally:
        community.stop_all()
    total = time.monotonic() - started
    log(f"{schedule.label}: {len(seen)} releases in {total:.0f} s (load {os.getloadavg()[0]:.1f})")
    return {"schedule": schedule.label, "rounds": schedule.rounds, "steps": schedule.steps,
            "seconds": round(total, 1), "release_seen_s": seen, "plan": plan, "project": str(project),
            "out": str(work), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def evaluate_releases(run: dict, em_every: int) -> list[dict]:
    """Score every release of one run (exact match every `em_every` releases and the last)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.client.evaluate import exact_match, heldout_loss
    from loracommons.client.model import apply_adapter
    from loracommons.coordinator.config import load_config
    from loracommons.coordinator.initial import decode_adapter
    from loracommons.coordinator.store import Store
    from loracommons.demo import base_model_path
    from loracommons.demo.references import SEQ_LEN, skill_sets

    torch.set_num_threads(1)
    project = Path(run["project"])
    cfg = load_config(project)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    base = AutoModelForCausalLM.from_pretrained(base_model_path(), dtype=torch.float32)
    sets = skill_sets(Path(run["out"]), run["plan"]["skills"])
    store = Store(project)
    rows = []
    try:
        releases = store.releases()
        for i, release in enumerate(releases):
            tensors = decode_adapter(store.blobs.get(release.adapter_digest))
            model = apply_adapter(base, cfg.lora, tensors, cfg.aggregation.mode).eval()
            em = em_every > 0 and ((i + 1) % em_every == 0 or i == len(releases) - 1)
            loss = {k: heldout_loss(model, tokenizer, recs, SEQ_LEN) for k, recs in sets.items()}
            row = {"version": release.version, "round": release.round,
                   "seconds": run["release_seen_s"].get(release.version),
                   "mean_heldout_loss": round(sum(loss.values()) / len(loss), 5),
                   "heldout_loss": {k: round(v, 5) for k, v in loss.items()}}
            if em:
                hits = {k: exact_match(model, tokenizer, recs, max_new_tokens=16) for k, recs in sets.items()}
                row["exact_match"] = {k: round(v, 4) for k, v in hits.items()}
                row["mean_exact_match"] = round(sum(hits.values()) / len(hits), 4)
            rows.append(row)
    finally:
        store.close()
    return rows


def references(run: dict, steps: int, volunteers: int, log) -> dict:  # noqa: ANN001
    """Pooled data, one trainer: the same sequential steps as a volunteer, and the same total compute."""
    from loracommons.demo.references import train_reference
    from loracommons.demo.report import _pooled_data

    out = Path(run["out"])
    data = _pooled_data(out, run["plan"])
    rows = {}
    for name, n in (("pooled-same-time", steps), ("centralized", volunteers * steps)):
        started = time.monotonic()
        scores = train_reference({"project": run["project"], "out": str(out),
                                  "skills": run["plan"]["skills"], "steps": n, "seed": 0, "data": str(data)})
        mean = {key: sum(s[key] for s in scores.values()) / len(scores)
                for key in ("heldout_loss", "exact_match")}
        rows[name] = {"steps": n, "seconds": round(time.monotonic() - started, 1), "per_skill": scores,
                      "mean_heldout_loss": round(mean["heldout_loss"], 5),
                      "mean_exact_match": round(mean["exact_match"], 4)}
        log(f"{name} ({n} steps): held-out loss {rows[name]['mean_heldout_loss']:.3f}, "
            f"exact match {rows[name]['mean_exact_match']:.0%} ({rows[name]['seconds']:.0f} s)")
    return rows


def run(schedules: list[Schedule], base: DemoSettings, work: Path, em_every: int, log) -> dict:  # noqa: ANN001
    started = time.monotonic()
    results = []
    for schedule in schedules:
        got = run_schedule(schedule, base, work / schedule.label, log)
        got["releases"] = evaluate_releases(got, em_every)
        last = got["releases"][-1]
        log(f"{schedule.label}: final held-out loss {last['mean_heldout_loss']:.3f}, "
            f"exact match {last.get('mean_exact_match', float('nan')):.0%}")
        results.append(got)
    steps = max(s.rounds * s.steps for s in schedules)
    refs = references(results[0], steps, base.volunteers, log)
    for got in results:
        for key in ("plan", "project", "out"):
            got.pop(key)
    return {
        "bench": "time_to_quality",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "driver": "real processes on 127.0.0.1: `loracommons coordinator start` + one `loracommons join` "
        "per volunteer (loracommons.demo.community), a release every round; each release scored "
        "afterwards with the demo's evaluation (loracommons.demo.report)",
        "config": {**asdict(base), "publish_every": 1, "schedules": [s.label for s in schedules],
                   "em_every_release": em_every},
        "runs": results,
        "references": refs,
        "loadavg_end": list(os.getloadavg()),
        "seconds": round(time.monotonic() - started, 1),
    }


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run_ in enumerate(report["runs"]):
        rows = [r for r in run_["releases"] if r["seconds"] is not None]
        axes[0].plot([r["seconds"] for r in rows], [r["mean_heldout_loss"] for r in rows], f"C{i}-",
                     marker="o", markersize=2, label=f"{run_['schedule']} (rounds x steps)")
        em = [r for r in rows if "mean_exact_match" in r]
        axes[1].plot([r["seconds"] for r in em], [100 * r["mean_exact_match"] for r in em], f"C{i}-",
                     marker="o", markersize=3, label=run_["schedule"])
    for j, (name, ref) in enumerate(report["references"].items()):
        style = "k--" if name == "centralized" else "k:"
        label = f"{name} ({ref['steps']} steps, one process: {ref['seconds']:.0f} s)"
        axes[0].axhline(ref["mean_heldout_loss"], linestyle=style[1:], color="k", label=label, alpha=0.6)
        axes[1].axhline(100 * ref["mean_exact_match"], linestyle=style[1:], color="k", alpha=0.6)
        del j
    axes[0].set_yscale("log")
    axes[0].set_title("mean held-out loss of each release")
    axes[1].set_title("mean exact match (%) of each release")
    for ax in axes:
        ax.set_xlabel("wall-clock seconds since the processes started")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("LoRA Commons time to quality: demo community on real processes, equal total compute")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default=None,
                        help=f"comma-separated ROUNDSxSTEPS (default {DEFAULT_SCHEDULES})")
    parser.add_argument("--volunteers", type=int, default=DemoSettings.volunteers)
    parser.add_argument("--train", type=int, default=DemoSettings.n_train, help="examples per skill")
    parser.add_argument("--heldout", type=int, default=DemoSettings.n_heldout, help="held-out per skill")
    parser.add_argument("--em-every", type=int, default=1, help="exact match every k releases (and the last)")
    parser.add_argument("--tiny", action="store_true", help="2 volunteers, tiny data, 2x2: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.schedules, args.volunteers, args.train, args.heldout = args.schedules or "2x2", 2, 32, 8
    schedules = [Schedule.parse(s) for s in (args.schedules or DEFAULT_SCHEDULES).split(",") if s]
    if not schedules or args.volunteers < 2 or min(s.rounds * s.steps for s in schedules) < 1:
        parser.error("need --volunteers >= 2 and schedules ROUNDSxSTEPS with both >= 1")
    base = DemoSettings(volunteers=args.volunteers, n_train=args.train, n_heldout=args.heldout,
                        round_timeout_s=120.0, lr_schedule="constant")  # as measured (results on file)
    with tempfile.TemporaryDirectory(prefix="lc-ttq-") as work:
        report = run(schedules, base, Path(work), args.em_every, _stderr)
    benchlib.write_json(args.out, report)
    png = plot(report, args.plot or args.out.with_name("time_to_quality.png"))
    print(f"{args.out} {png} ({report['seconds']:.0f} s)")
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
