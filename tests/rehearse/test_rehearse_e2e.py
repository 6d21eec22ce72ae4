"""A rehearsal end to end through the CLI: Ray, the coordinator's ServerApp, the volunteers' ClientApp.

Small on purpose (4 virtual volunteers, one of them hostile, 2 rounds of 1 step): it checks
the report, the signed releases in the rehearsal folder, and that the live project is untouched.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loracommons.demo.skills import write_skill_files

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def loracommons(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter (Ray, Flower and the libraries' output settings are
    process-wide: a test process that imported them before must not decide what this run does)."""
    return subprocess.run([sys.executable, "-m", "loracommons", *args], capture_output=True, text=True,
                          timeout=600)


def test_rehearsal_runs_the_project_rounds_and_leaves_the_live_project_alone(tmp_path):
    project = tmp_path / "proj"
    done = loracommons("coordinator", "init", str(project), "--base-model", "loracommons/demo-tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    paths = write_skill_files(tmp_path / "data", ["reverse", "sort"], n_train=20, n_heldout=8, seed=0)
    train = tmp_path / "train"
    train.mkdir()
    for p in paths:
        if ".train." in p.name:
            p.rename(train / p.name)
    live = _tree(project)

    done = loracommons(
        "coordinator", "rehearse", str(project), "--volunteers", "4", "--per-round", "4",
        "--data", str(train),
        "--split", "by-field:instruction", "--rounds", "2", "--steps", "1",
        "--hostile", "0.25:model_replacement", "--heldout", str(tmp_path / "data" / "reverse.heldout.jsonl"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 x model_replacement volunteer: admitted (clipped)" in done.stdout, done.stdout[-4000:]

    assert {p: h for p, h in _tree(project).items() if not p.startswith("rehearsals/")} == live
    (folder,) = (project / "rehearsals").iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["volunteers"] == 4 and report["behaviours"] == {"honest": 3, "model_replacement": 1}
    assert [r["status"] for r in report["rounds"]] == ["aggregated", "aggregated"]
    assert all(r["admitted"] == 4 and r["bytes"] > 0 and r["seconds"] > 0 for r in report["rounds"])
    assert [(f["round"], f["behaviour"], f["reason"]) for f in report["flagged"]] == [
        (1, "model_replacement", "clipped"), (2, "model_replacement", "clipped")]
    assert report["releases"] == [1, 2] and set(report["heldout"]) == {"initial", "final"}
    # The rehearsal's releases are signed by its own key, never the project's.
    rehearsal_key = (folder / "keys" / "release_key.pub").read_text()
    assert rehearsal_key != (project / "keys" / "release_key.pub").read_text()
    roster = json.loads((folder / "roster.json").read_text())
    assert len({r["fingerprint"] for r in roster}) == 4
    assert sorted(p.name for p in (folder / "releases").iterdir()) == ["v1", "v2"]
    assert not (project / "state.db").exists() and not (project / "releases").exists()
