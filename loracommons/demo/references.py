"""The demo's reference adapters: each volunteer alone, and one trainer on the pooled data.

A reference is a pure function of its inputs: the training file, the held-out files, the project's
LoRA and training settings and seed (version 0 is built from them), the step count and seed, the
embedded base model, the code that trains and scores, and the torch / transformers / peft versions.
`inputs` writes all of them down (file contents as sha256); a reference whose inputs match a
recorded one takes its scores instead of training again:

- `SHIPPED` (in the package): the default demo's references, measured by the maintainers, so the
  README's command trains only the community on a fresh machine;
- the user's cache (`cache_file()`): every reference a demo on this machine trained.

On a 2-core machine the references were about a third of the demo's CPU time. Any other input (a
`--rounds`, another torch, an edited trainer) misses and trains beside the federation as before;
`loracommons demo --train-references` always trains.

    loracommons demo --train-references --out /tmp/d && python -m loracommons.demo.references ship /tmp/d
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
from importlib import metadata
from pathlib import Path

import platformdirs

from loracommons.paths import APP

SEQ_LEN = 64
SHIPPED = Path(__file__).resolve().parent / "references.json"
#: Modules whose code decides a reference's scores (version 0, data, trainer, model, scoring); of this
#: one, the functions that train and score (`_own_code`), so that editing the cache does not void it.
CODE = ("loracommons.client.trainer", "loracommons.client.data", "loracommons.client.model",
        "loracommons.client.evaluate", "loracommons.protocol.lora", "loracommons.protocol.schedule",
        "loracommons.coordinator.initial")
LIBRARIES = ("torch", "transformers", "peft")


def cache_file() -> Path:
    return Path(platformdirs.user_cache_dir(APP)) / "demo-references.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return Path(spec.origin)


def _own_code() -> dict[str, str]:
    return {f"{__name__}.{f.__name__}": hashlib.sha256(inspect.getsource(f).encode()).hexdigest()
            for f in (skill_sets, scores, train_reference)}


def inputs(job: dict) -> dict:
    """Everything a reference's scores depend on, as plain JSON (files as their sha256)."""
    from loracommons.coordinator.config import load_config
    from loracommons.demo import base_model_path
    from loracommons.protocol.canonical import plain_json

    cfg = load_config(Path(job["project"]))
    heldout = Path(job["out"]) / "data" / "heldout"
    return plain_json({
        "data": _sha256(Path(job["data"])),
        "heldout": {skill: _sha256(heldout / f"{skill}.heldout.jsonl") for skill in job["skills"]},
        "steps": job["steps"],
        "seed": job["seed"],
        "project_seed": cfg.project.seed,
        "mode": cfg.aggregation.mode,
        "lora": dataclasses.asdict(cfg.lora),
        "train": dataclasses.asdict(cfg.train),
        "base_model": {p.name: _sha256(p) for p in sorted(base_model_path().iterdir()) if p.is_file()},
        "code": {**{m: _sha256(_source(m)) for m in CODE}, **_own_code()},
        "versions": {lib: metadata.version(lib) for lib in LIBRARIES},
    })  # as it reads back from a file (tuples as lists), so that equal inputs compare equal


def _read(path: Path) -> list[dict]:
    """The well-formed entries of a references file (none if it is missing or unreadable: they train)."""
    try:
        entries = json.loads(path.read_text())["references"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("inputs"), dict)
            and isinstance(e.get("scores"), dict)]


def recorded(found: dict) -> dict | None:
    """The scores recorded for exactly these inputs, shipped or cached on this machine, with where."""
    for source, path in (("shipped", SHIPPED), ("cached", cache_file())):
        for entry in _read(path):
            if entry["inputs"] == found:
                return {"scores": entry["scores"], "source": source, "measured": entry.get("measured")}
    return None


def _merge(path: Path, new: list[dict]) -> int:
    """Write `new` into a references file, replacing the entries of the same inputs; the count kept."""
    from loracommons.protocol.durable import atomic_write

    entries = [e for e in _read(path) if all(e["inputs"] != n["inputs"] for n in new)] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"references": entries}, indent=1, sort_keys=True) + "\n").encode())
    return len(entries)


def remember(found: dict, result: dict, measured: str) -> None:
    """Keep a trained reference's scores in this machine's cache."""
    _merge(cache_file(), [{"inputs": found, "scores": result, "measured": measured}])


def skill_sets(out: Path, skills: list[str]) -> dict[str, list[dict]]:
    """The demo's held-out set of each skill (`OUT/data/heldout/SKILL.heldout.jsonl`)."""
    from loracommons.client.data import load_records

    return {skill: load_records(out / "data" / "heldout" / f"{skill}.heldout.jsonl") for skill in skills}


def scores(model, tokenizer, sets: dict[str, list[dict]]) -> dict[str, dict]:  # noqa: ANN001
    """Held-out loss and exact match (greedy, 16 new tokens) per skill."""
    from loracommons.client.evaluate import exact_match, heldout_loss

    out = {}
    for skill, records in sets.items():
        out[skill] = {"heldout_loss": round(heldout_loss(model, tokenizer, records, SEQ_LEN), 4),
                      "exact_match": round(exact_match(model, tokenizer, records, max_new_tokens=16), 4)}
    return out


def train_reference(job: dict) -> dict:
    """Train one reference adapter alone (a volunteer's own data, or the pooled data) and score it.

    From the project's initial adapter with the project's trainer, for `steps` steps: run in a
    worker process of its own, one torch thread (two threads on two shared cores measured slower).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.client.data import load_records, tokenize
    from loracommons.client.model import apply_adapter
    from loracommons.client.trainer import train
    from loracommons.coordinator.config import load_config
    from loracommons.coordinator.initial import build_initial_adapter
    from loracommons.demo import base_model_path
    from loracommons.demo.report import _quiet

    torch.set_num_threads(1)
    _quiet()
    project = Path(job["project"])
    cfg = load_config(project)
    # version 0 is a function of the project file (its seed): built here rather than read from the
    # coordinator's store, which the coordinator, starting beside this worker, may not have written yet
    initial = build_initial_adapter(cfg)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    base = AutoModelForCausalLM.from_pretrained(base_model_path(), dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    model = apply_adapter(base, cfg.lora, initial, cfg.aggregation.mode)
    settings = dataclasses.replace(cfg.train, max_steps=job["steps"], max_minutes=30.0, seed=job["seed"])
    train(model, tokenizer, tokenize(load_records(Path(job["data"])), tokenizer, cfg.train.seq_len),
          settings, cfg.aggregation.mode, threads=1)
    return scores(model.eval(), tokenizer, skill_sets(Path(job["out"]), job["skills"]))


def ship(out: Path) -> int:
    """Record the references a demo trained (its `OUT/report.json`) in the shipped file: a maintainer's
    step after `loracommons demo --train-references` with the default settings."""
    report = json.loads((out / "report.json").read_text())
    trained = [{"inputs": r["inputs"], "scores": report["models"][name], "measured": r["measured"]}
               for name, r in report["references"]["each"].items() if r["source"] == "trained"]
    if not trained:
        print(f"{out}: this demo trained no reference (run it with --train-references)")
        return 1
    total = _merge(SHIPPED, trained)
    print(f"{SHIPPED}: {total} references, {len(trained)} from {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["ship"])
    parser.add_argument("out", type=Path, help="a demo's output folder")
    args = parser.parse_args(argv)
    return ship(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
