"""The demo's report: per-skill held-out loss and exact match of the base, of each
volunteer's local-only adapter (same steps, own data only) and of the community adapter.

The community adapter is loaded exactly as a user would load a download:
`PeftModel.from_pretrained(base, OUT/adapter)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loracommons.demo import references

POOLED = "pooled data, one trainer"
"""The reference a community is measured against: one trainer holding everyone's data."""


def _quiet() -> None:
    """No weight-loading progress bars or deprecation warnings in the middle of the demo's output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _pooled_data(out: Path, plan: dict) -> Path:
    """Every volunteer's training file in one: what a central trainer would hold."""
    path = out / "data" / "pooled.jsonl"
    path.write_text("".join(Path(v["data"]).read_text() for v in plan["volunteers"]))
    return path


@dataclass
class References:
    """The report's references: those recorded for exactly these inputs (`references.recorded`), and
    the others training in worker processes since `start_references`."""

    names: list[str]
    steps: int
    inputs: dict[str, dict]
    known: dict[str, dict]
    pool: Any = None
    pending: Any = None
    started: float = field(default_factory=time.monotonic)

    @property
    def training(self) -> list[str]:
        return [n for n in self.names if n not in self.known]

    def wait(self) -> dict[str, dict]:
        """Every reference's scores (blocks until the last worker is done); what trained is cached."""
        measured = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.pending is not None:
            for name, result in zip(self.training, self.pending.get(), strict=True):
                references.remember(self.inputs[name], result, measured)
                self.known[name] = {"scores": result, "source": "trained", "measured": measured}
            self.pool.join()
        return {name: self.known[name]["scores"] for name in self.names}

    def summary(self) -> dict:
        """For the report: each reference's inputs and where its scores came from."""
        trained = [n for n in self.names if self.known[n]["source"] == "trained"]
        return {"steps": self.steps, "seconds": round(time.monotonic() - self.started, 1),
                "trained": "beside the federation, sharing the cores" if trained else
                "none here: every reference was recorded for exactly these inputs",
                "each": {n: {"source": self.known[n]["source"], "measured": self.known[n].get("measured"),
                             "inputs": self.inputs[n]} for n in self.names}}

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def reference_jobs(out: Path, plan: dict, settings, project: Path) -> dict[str, dict]:  # noqa: ANN001
    """Each reference's training job by name: every volunteer alone, then the pooled trainer."""
    steps = settings.rounds * settings.steps_per_round
    common = {"project": str(project), "out": str(out), "skills": plan["skills"], "steps": steps}
    jobs = {f"{v['name']} (local only)": {**common, "data": v["data"], "seed": settings.seed + i}
            for i, v in enumerate(plan["volunteers"])}
    jobs[POOLED] = {**common, "data": str(_pooled_data(out, plan)), "seed": settings.seed}
    return jobs


def start_references(out: Path, plan: dict, settings, project: Path, console: Console) -> References:  # noqa: ANN001
    """Each volunteer alone and one trainer on the pooled data, each as many steps as a volunteer makes
    in the federation (rounds x steps). A reference recorded for exactly these inputs (shipped with
    the package for the default demo, or trained by an earlier demo on this machine) is taken as
    recorded unless `settings.train_references`; the others train on as many workers as cores (max 4),
    beside the federation: they use the CPU its processes leave idle while rounds wait on the network,
    so the demo takes about its total CPU time over the cores, not the federation's time plus theirs.
    (At the lowest priority, measured: on a machine busy with other work they barely ran at all.)"""
    import os
    from multiprocessing import get_context

    jobs = reference_jobs(out, plan, settings, project)
    steps = settings.rounds * settings.steps_per_round
    found = {name: references.inputs(job) for name, job in jobs.items()}
    known = {} if settings.train_references else {
        name: hit for name, f in found.items() if (hit := references.recorded(f)) is not None}
    refs = References(list(jobs), steps, found, known)
    if known:
        sources = sorted({hit["source"] for hit in known.values()})
        console.print(f"references ({steps} steps each): {len(known)} of {len(jobs)} recorded for exactly "
                      f"these inputs ({' and '.join(sources)}; --train-references trains them here)",
                      highlight=False)
    todo = refs.training
    if todo:
        workers = max(1, min(4, os.cpu_count() or 1, len(todo)))
        console.print(f"training {len(todo)} reference(s) beside the community ({steps} steps each, "
                      f"{workers} at a time): {', '.join(todo)}", highlight=False)
        refs.pool = get_context("spawn").Pool(workers)
        refs.pending = refs.pool.map_async(references.train_reference, [jobs[n] for n in todo], chunksize=1)
        refs.pool.close()
    return refs


def evaluate_all(out: Path, plan: dict, refs: References, console: Console) -> dict:
    """Scores of the base, the references (waiting for them) and the downloaded community adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.demo import base_model_path

    started = time.monotonic()
    torch.set_num_threads(1)
    _quiet()
    base_path = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    sets = references.skill_sets(out, plan["skills"])
    console.print("evaluating the base model and the downloaded community adapter ...", highlight=False)
    models: dict[str, dict] = {"base": references.scores(AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32).eval(), tokenizer, sets)}
    community = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), str(out / "adapter")).eval()
    community_scores = references.scores(community, tokenizer, sets)
    if refs.training:
        console.print("waiting for the references ...", highlight=False)
    models.update(refs.wait())
    models["community"] = community_scores
    report = summarize(plan, models, time.monotonic() - started)
    report["references"] = refs.summary()
    return report


#: Below the volunteer's own adapter by at most this many points still counts as "kept" (issue 12).
KEEP_POINTS = 0.10
#: The community adapter's exact match the demo aims at on every skill.
TARGET_EM = 0.80


def holder_rows(plan: dict, models: dict[str, dict]) -> list[dict]:
    """Per skill: did joining help the volunteer who holds it? Community vs that volunteer alone."""
    rows = []
    for skill in plan["skills"]:
        holders = [v["name"] for v in plan["volunteers"] if skill in v["skills"]]
        alone = max(models[f"{h} (local only)"][skill]["exact_match"] for h in holders)
        community = models["community"][skill]["exact_match"]
        diff = round(community - alone, 4)
        verdict = "yes" if diff > 0 else "kept" if diff > -KEEP_POINTS - 1e-9 else "no"
        rows.append({"skill": skill, "holders": holders, "alone": alone, "community": community,
                     "pooled": models[POOLED][skill]["exact_match"] if POOLED in models else None,
                     "difference": diff, "joining_helped": verdict})
    return rows


def summarize(plan: dict, models: dict[str, dict], eval_seconds: float = 0.0) -> dict:
    skills = plan["skills"]
    mean_em = {name: round(sum(s[k]["exact_match"] for k in skills) / len(skills), 4)
               for name, s in models.items()}
    mean_loss = {name: round(sum(s[k]["heldout_loss"] for k in skills) / len(skills), 4)
                 for name, s in models.items()}
    community, base = models["community"], models["base"]
    holders = holder_rows(plan, models)
    checks = {
        f"community_at_least_{TARGET_EM:.0%}_on_every_skill": all(
            community[k]["exact_match"] >= TARGET_EM - 1e-9 for k in skills),
        f"community_within_{KEEP_POINTS * 100:.0f}_points_of_the_holder_alone_on_every_skill": all(
            row["joining_helped"] != "no" for row in holders),
        "community_beats_base_on_every_skill": all(
            community[k]["exact_match"] > base[k]["exact_match"]
            and community[k]["heldout_loss"] < base[k]["heldout_loss"] for k in skills),
    }
    return {"skills": skills, "volunteers": plan["volunteers"], "models": models, "holders": holders,
            "mean_exact_match": mean_em, "mean_heldout_loss": mean_loss, "checks": checks,
            "eval_seconds": round(eval_seconds, 1)}


def contributions(out: Path, plan: dict, project: Path) -> list[dict]:
    """What each volunteer contributed, from the coordinator's store: updates admitted and refused
    (by reason), examples, mean staleness (async) and throughput."""
    from loracommons.coordinator.store import Store
    from loracommons.protocol import PublicKey

    names = {PublicKey.load(out / "identities" / f"volunteer-{i}.pub").fingerprint: v["name"]
             for i, v in enumerate(plan["volunteers"])}
    store = Store(project)
    try:
        rows = {c.fingerprint: c for c in store.contributions()}
    finally:
        store.close()
    found = []
    for fingerprint, name in names.items():
        c = rows.get(fingerprint)
        found.append({"volunteer": name, "admitted": c.admitted if c else 0,
                      "rejected": c.rejected if c else 0,
                      "rejected_by_reason": c.rejected_by_reason if c else {},
                      "examples": c.examples if c else 0,
                      "mean_staleness": None if c is None or c.mean_staleness is None
                      else round(c.mean_staleness, 3),
                      "updates_per_hour": None if c is None or c.updates_per_hour is None
                      else round(c.updates_per_hour, 1)})
    return found


def print_contributions(report: dict, console: Console) -> None:
    rows = report.get("contributions")
    if not rows:
        return
    table = Table(title=f"what each volunteer contributed ({report.get('schedule', 'sync')} schedule)",
                  header_style="bold")
    for col in ("volunteer", "updates admitted", "refused", "examples", "mean staleness", "updates/h"):
        table.add_column(col, justify="left" if col == "volunteer" else "right")
    for row in rows:
        reasons = ", ".join(f"{k} {n}" for k, n in row["rejected_by_reason"].items())
        refused = f"{row['rejected']}" + (f" ({reasons})" if reasons else "")
        table.add_row(row["volunteer"], str(row["admitted"]), escape(refused), str(row["examples"]),
                      "-" if row["mean_staleness"] is None else f"{row['mean_staleness']:.2f}",
                      "-" if row["updates_per_hour"] is None else f"{row['updates_per_hour']:.0f}")
    console.print(table)


def print_table(report: dict, console: Console) -> None:
    table = Table(title="did joining help the volunteer who holds each skill? held-out exact match",
                  header_style="bold")
    for col in ("skill", "held by", "alone", "community", "difference", "joining helped", "pooled data"):
        table.add_column(col, justify="left" if col in ("skill", "held by") else "right")
    marks = {"yes": "[green]yes[/]", "kept": "[yellow]kept (within 10 points)[/]", "no": "[red]NO[/]"}
    for row in report["holders"]:
        pooled = "-" if row["pooled"] is None else f"{row['pooled']:.0%}"
        table.add_row(row["skill"], ", ".join(row["holders"]), f"{row['alone']:.0%}",
                      f"{row['community']:.0%}", f"{row['difference'] * 100:+.0f} pts",
                      marks[row["joining_helped"]], pooled)
    console.print(table)
    _print_all(report, console)
    print_contributions(report, console)
    for check, ok in report["checks"].items():
        mark = "[green]yes[/]" if ok else "[red]NO[/]"
        console.print(f"  {check.replace('_', ' ')}: {mark}")


def _print_all(report: dict, console: Console) -> None:
    skills = report["skills"]
    table = Table(title="every model, every skill: held-out exact match (loss)", header_style="bold")
    table.add_column("model")
    for skill in skills:
        table.add_column(skill, justify="right")
    table.add_column("mean EM", justify="right", style="bold")
    for name, scores in report["models"].items():
        cells = [f"{scores[k]['exact_match']:.0%} ({scores[k]['heldout_loss']:.2f})" for k in skills]
        style = "bold green" if name == "community" else None
        label = name.replace("volunteer-", "vol-").replace(" (local only)", " alone")
        table.add_row(label, *cells, f"{report['mean_exact_match'][name]:.0%}", style=style)
    console.print(table)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    skills, models = report["skills"], report["models"]
    names = list(models)
    x = np.arange(len(skills))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for j, name in enumerate(names):
        em = [models[name][k]["exact_match"] * 100 for k in skills]
        loss = [models[name][k]["heldout_loss"] for k in skills]
        axes[0].bar(x + j * width, em, width, label=name)
        axes[1].bar(x + j * width, loss, width, label=name)
    for ax, title in ((axes[0], "held-out exact match (%)"), (axes[1], "held-out loss")):
        ax.set_xticks(x + width * (len(names) - 1) / 2, skills)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("LoRA Commons demo: community adapter vs each volunteer alone vs base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
