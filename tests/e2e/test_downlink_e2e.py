"""The downlink diet on real processes (issue 14): B only in ffa, bf16, refused on a wrong seed.

The project's initial adapter is made from one seed, then project.toml names another: every
ffa task then carries a seed that does not regenerate the A the coordinator holds. The
volunteers refuse round 1 before training (`downlink_mismatch`, recorded per update), the
coordinator sends them the whole adapter from then on, and the next rounds aggregate; the
release is a complete PEFT folder that plain peft loads.
"""

from __future__ import annotations

import pytest
import tomllib

from tests.e2e.conftest import FAST_ROUNDS, make_project, volunteer_data
from tests.e2e.procs import free_port, release_chain, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_wrong_seed_is_refused_then_the_whole_adapter_trains(tmp_path, procs, tiny_base):
    from loracommons.coordinator.config import ProjectConfig, load_config, write_default_toml
    from loracommons.coordinator.initial import initial_adapter
    from loracommons.coordinator.store import Store

    project = make_project(tmp_path, tiny_base, project={"seed": 5},
                           round={"rounds": 3, "volunteers_per_round": 2, "min_volunteers": 2,
                                  "timeout_s": 120.0, "downlink_dtype": "bfloat16"},
                           limits={"payload_dtype": "bfloat16"}, **FAST_ROUNDS)
    store = Store(project)
    try:
        initial_adapter(project, load_config(project), store)  # version 0 from seed 5
    finally:
        store.close()
    obj = tomllib.loads((project / "project.toml").read_text())
    obj["project"]["seed"] = 6  # what the tasks will name: not the seed of the A the coordinator holds
    write_default_toml(project / "project.toml", ProjectConfig.from_dict(obj))

    port, http_port = free_port(), free_port()
    coordinator = procs.coordinator(project, port, http_port)
    for i, data in enumerate(volunteer_data(tmp_path, 2)):
        procs.join(port, data, tmp_path / f"id{i}", f"vol{i}")
    wait_for(lambda: coordinator.poll() is not None, 240, "three rounds to finish")
    assert coordinator.returncode == 0, procs.log("coordinator.log")

    store = Store(project)
    try:
        rows = store.rounds()
        first = store.round_updates(1)
        later = [store.round_updates(r) for r in (2, 3)]
    finally:
        store.close()
    assert [row.status for row in rows] == ["skipped", "aggregated", "aggregated"]
    assert [(u.outcome, u.reason) for u in first] == [("rejected", "downlink_mismatch")] * 2
    assert all(u.outcome == "admitted" for updates in later for u in updates)
    assert all(len(updates) == 2 for updates in later)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chain = release_chain(project)
    assert [m.round for m in chain] == [2, 3]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      project / "releases" / f"v{chain[-1].version}")
    released = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert released and all((p.detach().float().abs().sum() > 0) for p in released.values())
    # a bf16 downlink: the released adapter is the rounded global everyone trained from
    import torch

    assert all(torch.equal(p.detach(), p.detach().to(torch.bfloat16).float()) for p in released.values())
