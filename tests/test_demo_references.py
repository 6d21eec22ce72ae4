"""The demo's references (each volunteer alone, the pooled trainer) are taken as recorded only for
exactly the inputs they were trained on; anything else trains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console

from loracommons.demo import references
from loracommons.demo.community import Community, DemoSettings
from loracommons.demo.report import POOLED, reference_jobs, start_references

SMALL = DemoSettings(volunteers=2, rounds=1, steps_per_round=1, n_train=16, n_heldout=2)


def community(folder: Path, settings: DemoSettings = SMALL) -> tuple[dict, Path]:
    c = Community(folder, settings, Console(quiet=True))
    plan = c.write_data()
    return plan, c.init_project()


def job(folder: Path, plan: dict, project: Path, **extra) -> dict:  # noqa: ANN003
    return {"project": str(project), "out": str(folder), "skills": plan["skills"], "steps": 1, "seed": 0,
            "data": plan["volunteers"][0]["data"], **extra}


def test_inputs_name_what_the_scores_depend_on_and_not_where_the_files_are(tmp_path):
    plan_a, project_a = community(tmp_path / "a")
    plan_b, project_b = community(tmp_path / "b")
    a = references.inputs(job(tmp_path / "a", plan_a, project_a))
    assert a == references.inputs(job(tmp_path / "b", plan_b, project_b))  # same inputs, other folder
    assert json.loads(json.dumps(a)) == a
    assert set(references.CODE) < set(a["code"]) and set(a["versions"]) == set(references.LIBRARIES)
    assert references.inputs(job(tmp_path / "a", plan_a, project_a, steps=2)) != a
    assert references.inputs(job(tmp_path / "a", plan_a, project_a, seed=1)) != a
    Path(plan_b["volunteers"][0]["data"]).write_text('{"prompt": "x", "response": "y"}\n')
    assert references.inputs(job(tmp_path / "b", plan_b, project_b)) != a
    plan_c, project_c = community(tmp_path / "c", dataclasses.replace(SMALL, learning_rate=2e-2))
    assert references.inputs(job(tmp_path / "c", plan_c, project_c)) != a


def test_an_unreadable_cache_is_no_cache(tmp_path):
    plan, project = community(tmp_path)
    found = references.inputs(job(tmp_path, plan, project))
    references.cache_file().parent.mkdir(parents=True, exist_ok=True)
    for junk in ("not json", '{"references": 3}', '{"references": [1, {"inputs": 2}]}'):
        references.cache_file().write_text(junk)
        assert references.recorded(found) is None
    references.remember(found, {"reverse": {"heldout_loss": 1.0, "exact_match": 0.5}}, "now")
    assert references.recorded(found)["source"] == "cached"


def test_a_second_demo_takes_what_the_first_trained_and_the_flag_trains_again(tmp_path):
    """Real training (1 step, in worker processes) the first time; the same inputs again start no
    worker and give the same scores; --train-references trains although they are recorded."""
    plan, project = community(tmp_path / "one")
    first = start_references(tmp_path / "one", plan, SMALL, project, Console(quiet=True))
    assert first.training == [*(f"volunteer-{i} (local only)" for i in range(2)), POOLED]
    scores = first.wait()
    assert first.summary()["trained"] == "beside the federation, sharing the cores"
    assert set(scores) == set(first.names) and all(set(s) == set(plan["skills"]) for s in scores.values())

    plan2, project2 = community(tmp_path / "two")
    second = start_references(tmp_path / "two", plan2, SMALL, project2, Console(quiet=True))
    assert second.training == [] and second.pool is None
    assert second.wait() == scores
    summary = second.summary()
    assert summary["trained"].startswith("none here")
    assert {e["source"] for e in summary["each"].values()} == {"cached"}

    plan3, project3 = community(tmp_path / "three")
    forced = dataclasses.replace(SMALL, train_references=True)
    third = start_references(tmp_path / "three", plan3, forced, project3, Console(quiet=True))
    try:
        assert third.training == third.names and third.pool is not None
    finally:
        third.stop()


@pytest.mark.timeout(120)
def test_the_shipped_references_are_the_default_demos(tmp_path):
    """The README's command takes its references from the package: the shipped file holds the default
    demo's, for this code and base model (only the library versions may differ: other versions
    train). After a change to the trainer or the scoring, refresh it (`demo/references.py`)."""
    settings = DemoSettings()
    plan, project = community(tmp_path, settings)
    shipped = [e["inputs"] for e in json.loads(references.SHIPPED.read_text())["references"]]

    def same(a: dict, b: dict) -> bool:
        return {k: v for k, v in a.items() if k != "versions"} == {k: v for k, v in b.items()
                                                                     if k != "versions"}

    for name, reference in reference_jobs(tmp_path, plan, settings, project).items():
        found = references.inputs(reference)
        assert any(same(found, s) for s in shipped), (
            f"no shipped reference for {name}: run `loracommons demo --train-references --out D` and "
            "`python -m loracommons.demo.references ship D`")


def test_ship_records_what_a_demo_trained(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(references, "SHIPPED", shipped)
    scores = {"reverse": {"heldout_loss": 0.1, "exact_match": 0.9}}
    each = {"volunteer-0 (local only)": {"source": "trained", "measured": "t1", "inputs": {"data": "a"}},
            POOLED: {"source": "cached", "measured": "t0", "inputs": {"data": "b"}}}
    (tmp_path / "report.json").write_text(json.dumps(
        {"models": {name: scores for name in each}, "references": {"each": each}}))
    assert references.ship(tmp_path) == 0
    assert references._read(shipped) == [{"inputs": {"data": "a"}, "scores": scores, "measured": "t1"}]
    assert references.recorded({"data": "a"})["source"] == "shipped"
    assert references.recorded({"data": "b"}) is None  # only what that demo trained is shipped
    each["volunteer-0 (local only)"]["source"] = "shipped"
    (tmp_path / "report.json").write_text(json.dumps(
        {"models": {name: scores for name in each}, "references": {"each": each}}))
    assert references.ship(tmp_path) == 1
