"""Hostile volunteers in real end-to-end runs: a coordinator, two honest `loracommons join` nodes,
and hostile nodes (the real client with one thing changed, see hostile_node.py), all on 127.0.0.1.

Three runs of two rounds each, behaviours grouped so the suite stays short:

    baseline   the two honest volunteers alone (the reference held-out loss and delta norms)
    envelope   TLS, allowlist membership, SuperNode authentication: forged signature, envelope
               signed by an unregistered key, replay, another project, stale nonce, two envelopes
               signed by one key in one round; five sybils sending one crafted update
               (absolute max_norm configured)
    payload    NaN/Inf, wrong tensor names and shapes, oversized payload, a pickle instead of
               safetensors, model replacement (x100), 1e9 claimed examples, a free rider;
               median clipping, free-rider ratio and the examples cap configured

Every hostile update must be rejected or neutralized with its reason in `coordinator status
--json`, every round must aggregate the honest updates, and the last release's held-out loss
must stay within 10% of the baseline's.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loracommons.coordinator.store import Store
from tests.e2e.procs import free_port, release_chain, status, wait_for
from tests.security.community import (
    Community,
    fingerprint,
    heldout_loss,
    latest_release_dir,
    make_project,
    record_result,
    register,
    tls_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROUNDS = 2
LOSS_TOLERANCE = 1.10
SYBIL_MAX_NORM_FACTOR = 4.0


@dataclass
class Node:
    name: str
    mode: str | None  # None: the real `loracommons join`
    key: Path
    data: Path
    env: dict = field(default_factory=dict)


@dataclass
class Run:
    project: Path
    status: dict
    loss: float
    seconds: float
    fingerprints: dict[str, str]  # node name -> fingerprint of its identity

    def updates(self, name: str | None = None) -> list[dict]:
        """Updates recorded for node `name` (by its key), or all of them."""
        rows = self.status["recent_updates"]
        return rows if name is None else [u for u in rows if u["fingerprint"] == self.fingerprints[name]]

    def reasons(self, name: str) -> list[str]:
        return [u["reason"] or u["outcome"] for u in self.updates(name)]


def run_community(workdir: Path, base: Path, heldout: list[dict], nodes: list[Node], *,
                  membership: str = "open", tls: bool = False, settings: dict | None = None) -> Run:
    """Start a coordinator and `nodes`, run ROUNDS rounds with every node, return what status shows."""
    workdir.mkdir(parents=True, exist_ok=True)
    round_settings = {"rounds": ROUNDS, "volunteers_per_round": len(nodes), "min_volunteers": 2,
                      "timeout_s": 180.0}
    settings = dict(settings or {})
    round_settings.update(settings.pop("round", {}))
    project = make_project(workdir, base, membership=membership, round=round_settings, **settings)
    if membership == "allowlist":
        for node in nodes:
            register(project, node.key)
    certs = tls_files(workdir / "tls") if tls else None
    community = Community(workdir)
    port, http_port = free_port(), free_port()
    started = time.monotonic()
    try:
        coordinator = community.coordinator(project, port, http_port, tls=certs, wait_nodes=len(nodes))
        auth = ["--node-auth"] if membership == "allowlist" else []  # SuperNode authentication
        for node in nodes:
            community.node(node.mode, f"127.0.0.1:{port}", node.data, node.key, node.name,
                           ca=certs[0] if certs else None, env=node.env, extra=auth)
        wait_for(lambda: coordinator.poll() is not None, 480, f"{ROUNDS} rounds with {len(nodes)} nodes",
                 procs=community.procs[1:])
        seconds = time.monotonic() - started
        assert coordinator.returncode == 0, community.log("coordinator.log")[-3000:]
    finally:
        community.stop_all()
    info = status(project)
    loss = heldout_loss(base, latest_release_dir(project), heldout)
    return Run(project, info, loss, seconds, {n.name: fingerprint(n.key) for n in nodes})


def honest_nodes(honest) -> list[Node]:  # noqa: ANN001
    return [Node(f"honest{i}", None, honest.keys[i], honest.data[i]) for i in range(2)]


def check_common(run: Run, baseline: Run) -> None:
    """Every round aggregated the honest updates; the chain verifies; the loss held."""
    info = run.status
    assert info["rounds"]["by_status"] == {"open": 0, "aggregated": ROUNDS, "skipped": 0, "failed": 0}
    assert [m.version for m in release_chain(run.project)] == list(range(1, ROUNDS + 1))
    for name in ("honest0", "honest1"):
        assert [u["outcome"] for u in run.updates(name)] == ["admitted"] * ROUNDS, run.updates(name)
    assert not [u for u in run.updates() if u["reason"] in ("internal_error", "volunteer_error")]
    assert run.loss <= LOSS_TOLERANCE * baseline.loss, (run.loss, baseline.loss)


def delta_norms(run: Run) -> list[float]:
    """The delta norms admission measured ("delta norm X" in each admitted update's message)."""
    return [float(m.group(1)) for u in run.updates() if u["outcome"] == "admitted"
            if (m := re.match(r"delta norm ([0-9.e+-]+)", u["message"]))]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_base, honest) -> Run:
    run = run_community(tmp_path_factory.mktemp("baseline"), tiny_base, honest.heldout, honest_nodes(honest))
    assert run.status["updates"] == {"admitted": 2 * ROUNDS, "rejected": 0, "rejected_by_reason": {}}
    untrained = heldout_loss(tiny_base, None, honest.heldout)
    # The community learned: a hostile run that lost the honest progress would miss the 10% bound.
    assert run.loss < untrained / LOSS_TOLERANCE**2, (run.loss, untrained)
    record_result("runs", "baseline", {"nodes": 2, "seconds": round(run.seconds, 1), "heldout_loss": run.loss,
                                       "base_model_loss": untrained, "delta_norms": delta_norms(run)})
    return run


def report(run: Run, baseline: Run, outcomes: dict[str, list[str]]) -> None:
    """Record, per behaviour, its tries and what each became (for SECURITY.md's table)."""
    for mode, reasons in outcomes.items():
        record_result("hostile", mode, {"run": run.project.parent.name.rstrip("0123456789"),
                                        "tries": len(reasons), "outcomes": dict(Counter(reasons)),
                                        "rounds_aggregated": ROUNDS,
                                        "loss_ratio": round(run.loss / baseline.loss, 4)})


@pytest.fixture(scope="module")
def envelope_run(tmp_path_factory, tiny_base, honest, baseline) -> tuple[Run, list[Node]]:
    """TLS, allowlist membership, SuperNode authentication; every node's own key is registered (so
    SuperNode authentication lets it in): what each hostile node changes is caught at admission.
    Five sybils ride along: an operator registered five keys that one person holds."""
    partner = honest.key("twin_a")
    nodes = [*honest_nodes(honest)] + [
        Node(mode, mode, honest.key(mode), honest.extra_data(mode, seed))
        for seed, mode in enumerate(("forged_signature", "unregistered_key", "replay", "wrong_project",
                                     "stale_nonce"), start=10)
    ] + [Node("twin_a", None, partner, honest.extra_data("twin_a", 20)),
         Node("twin_b", "twin", honest.key("twin_b"), honest.extra_data("twin_b", 21),
              env={"LC_HOSTILE_KEY": str(partner)})
    ] + [Node(f"sybil{i}", "sybil", honest.key(f"sybil{i}"), honest.extra_data(f"sybil{i}", 40 + i))
         for i in range(5)]
    bound = SYBIL_MAX_NORM_FACTOR * max(delta_norms(baseline))
    assert bound < 50, delta_norms(baseline)  # the sybils' crafted delta has norm 50
    settings = {"aggregation": {"max_norm": round(bound, 3), "max_examples_weight": 64}}
    run = run_community(tmp_path_factory.mktemp("envelope"), tiny_base, honest.heldout, nodes,
                        membership="allowlist", tls=True, settings=settings)
    record_result("runs", "envelope", {"nodes": len(nodes), "seconds": round(run.seconds, 1),
                                       "heldout_loss": run.loss, "baseline_loss": baseline.loss,
                                       "loss_ratio": run.loss / baseline.loss, "max_norm": bound,
                                       "rejected_by_reason": run.status["updates"]["rejected_by_reason"]})
    return run, nodes


def test_envelope_attacks_are_rejected(envelope_run, baseline):
    run, _ = envelope_run
    check_common(run, baseline)
    by_reason = Counter(u["reason"] for u in run.updates() if u["outcome"] == "rejected")
    # Rejected before the signer is known: recorded without a fingerprint; the node's key never scores.
    assert by_reason["bad_signature"] == ROUNDS and not run.updates("forged_signature")
    # Signed by a fresh key: its fingerprint is not the node's registered one.
    assert by_reason["not_registered"] == ROUNDS and not run.updates("unregistered_key")
    assert run.reasons("replay") == ["admitted", "wrong_round"]  # round 1 honest, round 2 replays it
    assert run.reasons("wrong_project") == ["wrong_project"] * ROUNDS
    assert run.reasons("stale_nonce") == ["wrong_nonce"] * ROUNDS
    twin = Counter(run.reasons("twin_a"))  # twin_a and twin_b both sign with twin_a's key
    assert twin == {"admitted": ROUNDS, "duplicate_signer": ROUNDS}, run.updates("twin_a")
    assert not run.updates("twin_b")
    report(run, baseline, {
        "forged_signature": ["bad_signature"] * ROUNDS,
        "unregistered_key": ["not_registered"] * ROUNDS,
        "replay": run.reasons("replay")[1:],
        "wrong_project": run.reasons("wrong_project"),
        "stale_nonce": run.reasons("stale_nonce"),
        "twin": ["duplicate_signer"] * ROUNDS,
    })


def test_sybils_are_bounded(envelope_run, baseline):
    """Five identities, one crafted update (a delta of norm 50 in a fixed direction). Median clipping
    and Krum cannot help once sybils are the majority of a round (they own the median, and identical
    updates are each other's nearest neighbours). What bounds them is the absolute max_norm at admission
    (here 4x the largest honest delta of the baseline), the examples cap per identity, and the
    operator's registry in allowlist projects."""
    run, _ = envelope_run
    check_common(run, baseline)
    for i in range(5):
        assert run.reasons(f"sybil{i}") == ["norm_too_large"] * ROUNDS, run.updates(f"sybil{i}")
    report(run, baseline, {"sybil": [r for i in range(5) for r in run.reasons(f"sybil{i}")]})


def test_payload_attacks_are_rejected_or_neutralized(tmp_path_factory, tiny_base, honest, baseline):
    """Open membership; median clipping, free-rider ratio and the examples cap configured."""
    marker = honest.folder / "unpickled-by-the-coordinator"
    modes = ("nonfinite", "bad_tensor", "oversize", "pickle", "scaled", "inflated", "free_rider")
    nodes = honest_nodes(honest) + [
        Node(mode, mode, honest.key(mode), honest.extra_data(mode, seed),
             env={"LC_HOSTILE_MARKER": str(marker)})
        for seed, mode in enumerate(modes, start=30)
    ]
    cap = 64  # above an honest volunteer's ~43 examples
    settings = {"round": {"min_volunteers": 3},
                "aggregation": {"clip": "median", "clip_factor": 2.0, "free_rider_ratio": 0.1,
                                "max_examples_weight": cap}}
    run = run_community(tmp_path_factory.mktemp("payload"), tiny_base, honest.heldout, nodes,
                        settings=settings)
    check_common(run, baseline)
    assert run.reasons("nonfinite") == ["non_finite"] * ROUNDS
    nan, inf = (u["message"] for u in run.updates("nonfinite"))
    assert "NaN or Inf" in nan and "NaN or Inf" in inf
    assert run.reasons("bad_tensor") == ["bad_tensor"] * ROUNDS
    names, shape = (u["message"] for u in run.updates("bad_tensor"))
    assert "tensor names differ" in names and "has shape" in shape
    # Refused on its size before the manifest is parsed: no fingerprint recorded.
    assert run.status["updates"]["rejected_by_reason"]["too_large"] == ROUNDS and not run.updates("oversize")
    assert run.reasons("pickle") == ["bad_tensor"] * ROUNDS and not marker.exists()
    assert run.reasons("scaled") == ["clipped"] * ROUNDS
    scales = [float(re.search(r"scaled by ([0-9.e+-]+)", u["message"]).group(1))
              for u in run.updates("scaled")]
    assert all(s < 0.05 for s in scales), scales  # 100x the honest delta, cut to 2x the median
    assert run.reasons("inflated") == ["weight_capped"] * ROUNDS
    assert [u["examples"] for u in run.updates("inflated")] == [cap] * ROUNDS
    assert run.reasons("free_rider") == ["free_rider"] * ROUNDS
    store = Store(run.project)
    try:
        credit = {v.fingerprint: v.examples_contributed for v in store.leaderboard()}
    finally:
        store.close()
    assert credit[run.fingerprints["inflated"]] == cap * ROUNDS  # no leaderboard credit for the claim
    record_result("runs", "payload", {"nodes": len(nodes), "seconds": round(run.seconds, 1),
                                      "heldout_loss": run.loss, "baseline_loss": baseline.loss,
                                      "loss_ratio": run.loss / baseline.loss, "clip_scales": scales,
                                      "rejected_by_reason": run.status["updates"]["rejected_by_reason"]})
    report(run, baseline, {
        mode: run.reasons(mode) for mode in ("nonfinite", "bad_tensor", "pickle", "scaled", "inflated",
                                             "free_rider")
    } | {"oversize": ["too_large"] * ROUNDS})
