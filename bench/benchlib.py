"""Helpers shared by the bench scripts: machine description, JSON output, demo data and identities.

The bench scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path``
and they import this module as ``benchlib``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import random
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Cores, CPU model, load and library versions: what a reader needs to weigh a number."""
    info = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }
    for name in ("numpy", "torch", "transformers", "peft", "flwr"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return info


def write_json(path: Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def seeded_identity(path: Path, label: str) -> Path:
    """A volunteer key derived from `label`: the same label gives the same key, run after run.

    The volunteer's data order depends on its fingerprint, so fixed keys make the
    quality runs reproducible (and the same volunteer sees the same order in every method).
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from loracommons.protocol.identity import SigningKey

    if path.exists():
        return path
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    secret = int.from_bytes(hashlib.sha256(f"loracommons-bench:{label}".encode()).digest(), "big")
    SigningKey(ec.derive_private_key(secret % (order - 1) + 1, ec.SECP256R1())).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def skill_data(out: Path, n_volunteers: int, n_train: int, n_heldout: int, seed: int) -> dict:
    """Non-IID data for the demo's new skills: each volunteer's train file, held-out sets, pooled file.

    Each volunteer holds ONE skill, as in `loracommons demo`: the community covers the first
    min(N, 5) of the demo's skills (`DEMO_SKILLS`, fastest to learn first), dealt round-robin
    (`skills_for_volunteer`), so with 6 volunteers one skill has two holders, who draw
    different training examples. Held-out sets cover the community's skills; no training
    input equals a held-out input of its skill.
    """
    from loracommons.demo.community import DEMO_SKILLS
    from loracommons.demo.skills import make_examples, skills_for_volunteer

    community = list(DEMO_SKILLS[: min(n_volunteers, len(DEMO_SKILLS))])
    heldout = {}
    for skill in community:
        rows = make_examples(skill, n_heldout, seed, "heldout")
        write_jsonl(out / "heldout" / f"{skill}.jsonl", rows)
        heldout[skill] = rows
    volunteers, pooled = [], []
    for i in range(n_volunteers):
        skills = skills_for_volunteer(i, n_volunteers, community)
        rows = []
        for skill in skills:
            banned = {r["input"] for r in heldout[skill]}
            rows += make_examples(skill, n_train, seed + 1 + i, "train", exclude=banned)
        path = write_jsonl(out / f"volunteer-{i}" / "train.jsonl", rows)
        volunteers.append(
            {"name": f"volunteer-{i}", "skills": skills, "data": str(path), "examples": len(rows)}
        )
        pooled += rows
    random.Random(seed).shuffle(pooled)
    pooled_path = write_jsonl(out / "pooled" / "train.jsonl", pooled)
    return {
        "skills": community,
        "heldout": heldout,
        "volunteers": volunteers,
        "pooled": {"name": "pooled", "data": str(pooled_path), "examples": len(pooled)},
    }
