"""A late reply holding anything at all is recorded as `late`; it never stops the round loop (issue 15, 1).

The review's case: an unsigned reply arriving after its round closed, whose manifest carries a
400-digit `train_loss`, raised OverflowError out of `Coordinator._record_late` and killed
`Coordinator.run`. The unit cases use a stand-in spec'd like flwr's `Message`; the last test
runs it end to end with real processes (hostile_node.py mode `late_overflow`).
"""

from __future__ import annotations

import json
from unittest.mock import MagicMock, PropertyMock

import numpy as np
import pytest
from flwr.app import Message

from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.rounds import Coordinator
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.errors import Reason
from loracommons.protocol.flower_app import envelope_content
from loracommons.protocol.identity import SigningKey

PAYLOAD = encode_tensors({"a.lora_B.weight": np.ones((2, 2), np.float32)})
MANIFEST = {"format_version": 1, "project_id": "p", "round": 1, "nonce": "00" * 16,
            "base_adapter_digest": "ab" * 32, "base_model_id": "m", "base_model_revision": "r",
            "lora_config_digest": "cd" * 32, "examples": 8, "steps": 4, "train_loss": 1.5,
            "payload_sha256": "ef" * 32, "payload_bytes": len(PAYLOAD), "payload_dtype": "float32",
            "signer": SigningKey.generate().public.openssh}


def with_raw(name: str, fragment: str) -> bytes:
    return canonical_json({**MANIFEST, name: "@@"}).replace(b'"@@"', fragment.encode())


def reply_with(content) -> MagicMock:  # noqa: ANN001
    reply = MagicMock(spec=Message)
    reply.has_error.return_value = False
    type(reply).content = content if isinstance(content, PropertyMock) else PropertyMock(return_value=content)
    return reply


def exploding() -> PropertyMock:
    return PropertyMock(side_effect=RuntimeError("records shaped like nothing Flower makes"))


@pytest.fixture
def coordinator(tmp_path) -> Coordinator:
    events: list = []
    coord = Coordinator(tmp_path, ProjectConfig(), MagicMock(), SigningKey.generate("coordinator"),
                        on_event=lambda event: events.append((event.name, event.details())))
    coord.events = events  # type: ignore[attr-defined]
    return coord


@pytest.mark.parametrize("content", [
    envelope_content(with_raw("train_loss", "1" * 400), PAYLOAD, b"\0" * 64),
    envelope_content(with_raw("examples", "9" * 400), PAYLOAD, b"\0" * 64),
    envelope_content(with_raw("train_loss", "1e400"), PAYLOAD, b"\0" * 64),
    envelope_content(b"[" * 4000, PAYLOAD, b""),
    envelope_content(json.dumps(MANIFEST).encode(), PAYLOAD, b"not a signature"),
    exploding(),
], ids=["400-digit-loss", "400-digit-examples", "1e400", "deep-nesting", "bad-signature", "raising-content"])
def test_late_reply_is_recorded_late_whatever_it_holds(coordinator, content):
    coordinator._record_late(3, reply_with(content), 2, 7)
    coordinator.store.record_update.assert_called_once()
    args, kwargs = coordinator.store.record_update.call_args
    assert args[:3] == (3, None, "rejected") and kwargs["reason"] == Reason.LATE
    assert coordinator.events == [("update", {"round": 3, "accepted": False, "reason": "late"})]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_late_reply_with_a_huge_number_does_not_stop_the_coordinator(tmp_path, tiny_base, honest):
    """Real processes on 127.0.0.1: two honest `join` nodes and a straggler whose round-1 reply
    arrives in round 2 with a 400-digit train_loss. The coordinator records it late and runs on."""
    from tests.e2e.procs import free_port, release_chain, status, wait_for
    from tests.security.community import Community, fingerprint, make_project, record_result

    timeout_s = 22.0
    project = make_project(tmp_path, tiny_base, round={"rounds": 2, "volunteers_per_round": 3,
                                                        "min_volunteers": 2, "timeout_s": timeout_s})
    community = Community(tmp_path)
    port, http_port = free_port(), free_port()
    straggler = honest.key("late-overflow")
    try:
        coordinator = community.coordinator(project, port, http_port, wait_nodes=3)
        address = f"127.0.0.1:{port}"
        procs = [community.node(None, address, honest.data[i], honest.keys[i], f"honest{i}") for i in (0, 1)]
        procs.append(community.node("late_overflow", address, honest.extra_data("late", 52), straggler,
                                    "late-overflow", env={"LC_HOSTILE_SLEEP": str(timeout_s + 3)}))
        wait_for(lambda: coordinator.poll() is not None, 300, "two rounds to finish", procs=procs[:2])
        log = community.log("coordinator.log")
        assert coordinator.returncode == 0, log[-3000:]
    finally:
        community.stop_all()
    assert "OverflowError" not in log
    info = status(project)
    rounds = {r["round"]: r["status"] for r in info["recent_rounds"]}
    assert rounds == {1: "aggregated", 2: "aggregated"}
    late = [u for u in info["recent_updates"] if u["reason"] == "late"]
    assert len(late) == 1 and late[0]["fingerprint"] is None  # unsigned: attributed to no key
    assert [m.round for m in release_chain(project)] == [1, 2]
    ours = [u["reason"] or u["outcome"] for u in info["recent_updates"]
            if u["fingerprint"] == fingerprint(straggler)]
    record_result("faults", "late_reply_400_digit_number", {
        "tries": 1, "coordinator_survived": True, "recorded_as": "late", "rounds_aggregated": 2,
        "straggler_round_2": ours})
