"""Nested ranks on real processes: one volunteer joins with --max-rank below the project's rank."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.e2e.conftest import FAST_ROUNDS, make_project, volunteer_data
from tests.e2e.procs import free_port, release_chain, status, wait_for
from tests.e2e.test_coordinator_e2e import heldout_loss

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_rank_2_volunteer_in_a_rank_4_community(tmp_path, procs, tiny_base):
    assert FAST_ROUNDS["lora"]["r"] == 4
    project = make_project(tmp_path, tiny_base, round={"rounds": 2, "volunteers_per_round": 2,
                                                        "min_volunteers": 2, "timeout_s": 120.0},
                           **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    coordinator = procs.coordinator(project, port, http_port)
    data = volunteer_data(tmp_path, 2)
    procs.join(port, data[0], tmp_path / "id0", "vol0")
    procs.join(port, data[1], tmp_path / "id1", "vol1", extra=["--max-rank", "2"])
    wait_for(lambda: coordinator.poll() is not None, 240, "two rounds to finish")
    assert coordinator.returncode == 0, procs.log("coordinator.log")
    info = status(project)
    assert info["rounds"]["by_status"]["aggregated"] == 2
    assert info["updates"]["admitted"] == 4 and info["updates"]["rejected"] == 0, info["updates"]
    small = one_line(procs.log("vol1.log"))
    assert "rank: at most 2 (--max-rank" in small, small
    assert "round 1: training rank 2 of the project's 4 (--max-rank 2)" in small, small
    assert "training rank" not in procs.log("vol0.log")
    notes = [json.loads((tmp_path / f"vol{i}.json").read_text()) for i in range(2)]
    assert all(n["rounds_sent"] == 2 for n in notes)

    from loracommons.coordinator.store import Store

    store = Store(project)
    try:
        round_notes = [row.note for row in store.rounds()]
    finally:
        store.close()
    assert all("nested_rank_updates=1" in note and "untrained_columns=0" in note for note in round_notes), (
        round_notes)

    # the release is a plain rank-4 PEFT adapter: it loads with PeftModel.from_pretrained and helps
    chain = release_chain(project)
    assert [m.version for m in chain] == [1, 2]
    release = project / "releases" / "v2"
    config = json.loads((release / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    from safetensors.numpy import load_file

    tensors = load_file(str(release / "adapter_model.safetensors"))
    b = [v for n, v in tensors.items() if ".lora_B." in n]
    assert b and all(v.shape[1] == 4 for v in b)
    # columns 2 and 3 were trained by vol0 alone, 0 and 1 by both: all moved from zero
    assert all(np.abs(v[:, 2:]).sum() > 0 and np.abs(v[:, :2]).sum() > 0 for v in b)
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text((tmp_path / "data1.jsonl").read_text())
    assert heldout_loss(tiny_base, release, held_out) < heldout_loss(tiny_base, None, held_out)
