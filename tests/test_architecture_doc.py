"""ARCHITECTURE.md stays true: every file it names exists, and nothing in the repo points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED = re.compile(r"`((?:protocol|client|coordinator|loracommons|tests|bench)/[\w/.-]+\.(?:py|md))`")


def test_every_file_the_architecture_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(NAMED.findall(text))
    assert len(named) > 30
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


def test_every_product_module_is_in_the_architecture():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    folders = ("protocol", "client", "coordinator")
    modules = [p for f in folders for p in sorted((ROOT / f).glob("*.py")) if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if p.name not in text]
    assert missing == [], "ARCHITECTURE.md says nothing of these modules"


def test_nothing_tracked_points_outside_the_repo():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = []
    me = str(Path(__file__).relative_to(ROOT))
    for name in [n for n in tracked.split() if n != me]:
        path = ROOT / name
        if path.suffix in {".md", ".py", ".toml", ".sh", ".yaml", ".yml"} and path.is_file():
            if "../shared" in path.read_text(errors="replace"):
                offenders.append(name)
    assert offenders == []
