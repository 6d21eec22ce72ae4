"""Coordinator and volunteers as real processes on 127.0.0.1: rounds, releases, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST_ROUNDS, make_project, volunteer_data
from tests.e2e.procs import free_port, read_json, release_chain, status, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]




def heldout_loss(base: Path, adapter: Path | None, data: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.client.data import load_records
    from loracommons.client.evaluate import heldout_loss as loss_of

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return loss_of(model, tokenizer, load_records(data), 64)


def test_three_volunteers_three_rounds_three_releases(tmp_path, procs, tiny_base):
    project = make_project(tmp_path, tiny_base, round={"rounds": 3, "volunteers_per_round": 3,
                                                        "min_volunteers": 3, "timeout_s": 120.0},
                           **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    coordinator = procs.coordinator(project, port, http_port)
    for i, data in enumerate(volunteer_data(tmp_path, 3)):
        procs.join(port, data, tmp_path / f"id{i}", f"vol{i}")
    wait_for(lambda: coordinator.poll() is not None, 240, "three rounds to finish")
    assert coordinator.returncode == 0, procs.log("coordinator.log")
    info = status(project)
    assert info["rounds"]["by_status"]["aggregated"] == 3
    assert info["updates"]["admitted"] == 9 and info["updates"]["rejected"] == 0
    assert info["volunteers"]["contributed"] == 3
    chain = release_chain(project)
    assert [m.version for m in chain] == [1, 2, 3] and [m.round for m in chain] == [1, 2, 3]
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text((tmp_path / "data0.jsonl").read_text())
    base_loss = heldout_loss(tiny_base, None, held_out)
    community_loss = heldout_loss(tiny_base, project / "releases" / "v3", held_out)
    assert community_loss < base_loss, (community_loss, base_loss)
    # federated evaluation: each round's eval loss (the median of the volunteers' own held-out losses of
    # the version the round started from) is written, and falls as the community's adapter learns
    from loracommons.coordinator.store import Store

    store = Store(project)
    try:
        evals = [row.eval_loss for row in store.rounds()]
    finally:
        store.close()
    assert all(e is not None and math.isfinite(e) for e in evals), evals
    assert evals[-1] < evals[0], evals
    # each volunteer saw its updates admitted
    notes = [json.loads((tmp_path / f"vol{i}.json").read_text()) for i in range(3)]
    assert all(n["rounds_sent"] == 3 for n in notes)


def test_kill9_mid_round_then_resume(tmp_path, procs, tiny_base):
    project = make_project(tmp_path, tiny_base, round={"rounds": 3, "volunteers_per_round": 2,
                                                        "min_volunteers": 2, "timeout_s": 120.0},
                           **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    first = procs.coordinator(project, port, http_port, log="coordinator1.log")
    # paced to 2 steps a second: each round trains for 4 s, idle machine or not (no CPU spent on
    # steps), a window the kill is aimed into
    for i, data in enumerate(volunteer_data(tmp_path, 2)):
        procs.join(port, data, tmp_path / f"id{i}", f"vol{i}", extra=["--max-steps-per-second", "2"])

    def both_training_round_2() -> bool:
        states = [read_json(tmp_path / f"vol{i}.json") or {} for i in range(2)]
        return all(s.get("state") == "training" and s.get("round") == 2 for s in states)

    # kill -9 while both volunteers hold round 2's task and train it (their status files say so)
    wait_for(both_training_round_2, 180, "both volunteers to train round 2", interval=0.1, procs=[first])
    procs.kill9(first)
    interrupted = status(project)
    assert interrupted["rounds"]["open"] == 2 and interrupted["latest_release"]["version"] == 1
    second = procs.coordinator(project, port, http_port, log="coordinator2.log")
    wait_for(lambda: second.poll() is not None, 240, "the resumed run to finish")
    assert second.returncode == 0, procs.log("coordinator2.log")
    chain = release_chain(project)
    assert [m.version for m in chain] == [1, 2, 3]
    assert [m.round for m in chain] == [1, 2, 3]
    info = status(project)
    assert info["rounds"]["by_status"] == {"open": 0, "aggregated": 3, "skipped": 0, "failed": 0}
    assert "resume" in procs.log("coordinator2.log")
