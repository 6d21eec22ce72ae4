"""The demo's report: per-skill held-out loss and exact match of the base, of each
volunteer's local-only adapter (same steps, own data only) and of the community adapter.

The community adapter is loaded exactly as a user would load a download:
`PeftModel.from_pretrained(base, OUT/adapter)`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SEQ_LEN = 64


def _skill_sets(out: Path, skills: list[str]) -> dict[str, list[dict]]:
    from loracommons.client.data import load_records

    return {skill: load_records(out / "data" / "heldout" / f"{skill}.heldout.jsonl") for skill in skills}


def _scores(model, tokenizer, sets: dict[str, list[dict]]) -> dict[str, dict]:  # noqa: ANN001
    from loracommons.client.evaluate import exact_match, heldout_loss

    out = {}
    for skill, records in sets.items():
        out[skill] = {"heldout_loss": round(heldout_loss(model, tokenizer, records, SEQ_LEN), 4),
                      "exact_match": round(exact_match(model, tokenizer, records, max_new_tokens=16), 4)}
    return out


def _local_only(base, tokenizer, project: Path, data: Path, settings, seed: int) -> object:  # noqa: ANN001
    """A volunteer's adapter trained alone: from the same initial adapter, the same total steps."""
    from loracommons.client.data import load_records, tokenize
    from loracommons.client.model import apply_adapter
    from loracommons.client.trainer import train
    from loracommons.coordinator.config import load_config
    from loracommons.coordinator.initial import decode_adapter
    from loracommons.coordinator.store import Store

    cfg = load_config(project)
    store = Store(project)
    try:
        pointer = json.loads((project / "initial_adapter.json").read_text())
        initial = decode_adapter(store.blobs.get(pointer["sha256"]))
    finally:
        store.close()
    model = apply_adapter(base, cfg.lora, initial, cfg.aggregation.mode)
    steps = settings.rounds * settings.steps_per_round
    train_settings = dataclasses.replace(cfg.train, max_steps=steps, max_minutes=30.0, seed=seed)
    train(model, tokenizer, tokenize(load_records(data), tokenizer, cfg.train.seq_len), train_settings,
          cfg.aggregation.mode, threads=1)
    return model


def evaluate_all(out: Path, plan: dict, settings, project: Path, console: Console) -> dict:  # noqa: ANN001
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.demo import base_model_path

    started = time.monotonic()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    base_path = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    sets = _skill_sets(out, plan["skills"])
    models: dict[str, dict] = {}
    console.print("evaluating the base model ...", highlight=False)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    models["base"] = _scores(base, tokenizer, sets)
    for i, volunteer in enumerate(plan["volunteers"]):
        console.print(f"training and evaluating {volunteer['name']}'s local-only adapter "
                      f"({settings.rounds * settings.steps_per_round} steps on its own data) ...",
                      highlight=False)
        fresh = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        for p in fresh.parameters():
            p.requires_grad_(False)
        data = Path(volunteer["data"])
        local = _local_only(fresh, tokenizer, project, data, settings, seed=settings.seed + i)
        models[f"{volunteer['name']} (local only)"] = _scores(local, tokenizer, sets)
    console.print("evaluating the downloaded community adapter ...", highlight=False)
    community = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), str(out / "adapter")).eval()
    models["community"] = _scores(community, tokenizer, sets)
    return summarize(plan, models, time.monotonic() - started)


def summarize(plan: dict, models: dict[str, dict], eval_seconds: float = 0.0) -> dict:
    skills = plan["skills"]
    mean_em = {name: round(sum(s[k]["exact_match"] for k in skills) / len(skills), 4)
               for name, s in models.items()}
    mean_loss = {name: round(sum(s[k]["heldout_loss"] for k in skills) / len(skills), 4)
                 for name, s in models.items()}
    locals_ = [n for n in models if n.endswith("(local only)")]
    community, base = models["community"], models["base"]
    checks = {
        "community_beats_every_local_on_mean_exact_match": all(mean_em["community"] > mean_em[n]
                                                               for n in locals_),
        "community_beats_base_on_every_skill": all(
            community[k]["exact_match"] > base[k]["exact_match"]
            and community[k]["heldout_loss"] < base[k]["heldout_loss"] for k in skills),
    }
    return {"skills": skills, "volunteers": plan["volunteers"], "models": models,
            "mean_exact_match": mean_em, "mean_heldout_loss": mean_loss, "checks": checks,
            "eval_seconds": round(eval_seconds, 1)}


def print_table(report: dict, console: Console) -> None:
    skills = report["skills"]
    table = Table(title="held-out exact match (loss) per skill", header_style="bold")
    table.add_column("model")
    for skill in skills:
        table.add_column(skill, justify="right")
    table.add_column("mean EM", justify="right", style="bold")
    for name, scores in report["models"].items():
        cells = [f"{scores[k]['exact_match']:.0%} ({scores[k]['heldout_loss']:.1f})" for k in skills]
        style = "bold green" if name == "community" else None
        label = name.replace("volunteer-", "vol-").replace(" (local only)", " alone")
        table.add_row(label, *cells, f"{report['mean_exact_match'][name]:.0%}", style=style)
    console.print(table)
    for check, ok in report["checks"].items():
        mark = "[green]yes[/]" if ok else "[red]NO[/]"
        console.print(f"  {check.replace('_', ' ')}: {mark}")


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
