"""The quality bench measures the product's round: `federate` goes through `coordinator.round.Round`.

Volunteers are stand-ins here (numpy updates, each signed with its own key) so that the
test needs no model: what it checks is the coordinator side of the bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from loracommons.coordinator.initial import decode_adapter
from loracommons.coordinator.round import Round
from loracommons.protocol import modes, wire
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.downlink import Downlink
from loracommons.protocol.envelope import sign_update
from loracommons.protocol.identity import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_bench  # noqa: E402  (bench/ is a folder of scripts, put on the path above)


class StandIn:
    """Signs a noisy copy of the global's sent tensors, as a volunteer's update."""

    def __init__(self, seed: int, on_sent) -> None:  # noqa: ANN001
        self.key, self.rng, self.on_sent = SigningKey.generate(), np.random.default_rng(seed), on_sent
        self.held = b""  # the last downlink body: what a delta applies to

    def run_round(self, task, data: bytes, link: Downlink | None = None):  # noqa: ANN001, ANN201
        """Reads the downlink's tensors (the ones the mode trains: all this stand-in needs)."""
        link = link or Downlink()
        body = wire.unpack(link.encoding, data, 1 << 30)
        if link.delta_from:
            body = np.bitwise_xor(np.frombuffer(body, np.uint8), np.frombuffer(self.held, np.uint8)).tobytes()
        self.held = body
        g = decode_adapter(body)
        tensors = {
            n: (g[n] + 0.01 * self.rng.standard_normal(g[n].shape)).astype(np.float32)
            for n in modes.get(task.mode).sent_names(g)
        }
        payload = encode_tensors(tensors, dtype=task.payload_dtype)
        self.on_sent("sent", {"train_loss": 1.0, "seconds": 0.01})
        return sign_update(self.key, payload, **task.claims(), examples=20, steps=1, train_loss=1.0)


@pytest.mark.parametrize("method", ["ffa", "exact", "ffa-bf16"])
def test_federate_drives_the_products_round(method, tmp_path, monkeypatch):
    offered: list[str] = []
    real_offer = Round.offer

    def spy(self, envelope):  # noqa: ANN001, ANN202
        record = real_offer(self, envelope)
        offered.append(record.reason)
        return record

    monkeypatch.setattr(Round, "offer", spy)
    monkeypatch.setattr(
        quality_bench,
        "make_volunteers",
        lambda participants, work, on_sent: [StandIn(i, on_sent) for i, _ in enumerate(participants)],
    )

    def evaluate(tensors, em):  # noqa: ANN001, ANN202
        return {"per_skill": {}, "mean_heldout_loss": 1.0, **({"mean_exact_match": 0.0} if em else {})}

    settings = quality_bench.Settings(rounds=2, steps=1, em_every=0)
    participants = [{"name": f"v{i}", "data": ""} for i in range(3)]
    quiet = lambda line: None  # noqa: E731
    out = quality_bench.federate(
        quality_bench.BY_NAME[method], participants, 1, settings, evaluate, tmp_path, method, quiet
    )
    assert offered == ["accepted"] * 6
    assert len(out["rounds"]) == 2 and out["payload_dtype"] in ("float32", "bfloat16")
    for row in out["rounds"]:
        exactness = row["exactness"]  # exact: the best rank-r cut of the mean; ffa: the mean itself
        assert exactness["rel_frobenius_error"] <= exactness["best_rank_r_rel_error"] + 1e-3
        assert row["bytes_up_per_volunteer"] > 0
        if method.startswith("ffa"):  # the real downlink: B only, packed
            assert row["bytes_down_wire_per_volunteer"] < 0.6 * row["bytes_down_per_volunteer"]


def _run(loss: float, em: float, skills: list[str]) -> dict:
    per_skill = {k: {"heldout_loss": loss, "exact_match": em} for k in skills}
    return {"rounds": [{"mean_heldout_loss": loss, "mean_exact_match": em, "per_skill": per_skill}]}


def test_summary_of_some_methods_states_both_comparisons():
    """`--methods ffa,centralized-ffa,pooled-same-time,local-only`: both of issue 12's loss ratios,
    each marked met or missed; the comparison with fedavg is absent (None), not passed or failed."""
    skills = ["reverse", "vowels"]
    plan = {"skills": skills, "volunteers": [{"name": f"volunteer-{i}", "skills": [k], "examples": 4}
                                             for i, k in enumerate(skills)]}
    runs = {"centralized-ffa": _run(0.1, 0.9, skills), "pooled-same-time": _run(0.3, 0.7, skills),
            "ffa": _run(0.32, 0.8, skills)}
    summary = quality_bench.summarize(2, runs, [_run(2.0, 0.45, skills)] * 2, plan)
    ffa = summary["checks"]["ffa"]
    assert set(summary["checks"]) == {"ffa"}
    assert ffa["loss_ratio_equal_sequential_steps"] == pytest.approx(0.32 / 0.3, abs=1e-4)
    assert ffa["loss_ratio_equal_total_compute"] == pytest.approx(3.2)
    assert ffa["equal_sequential_steps_met"] is True and ffa["equal_total_compute_met"] is False
    assert ffa["not_worse_than_fedavg"] is None and ffa["fedavg_heldout_loss"] is None
    assert summary["target_met"] is False
