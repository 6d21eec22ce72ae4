"""The Flower-free round: signed envelopes in, store records and the new adapter out."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.round import LOSS_CEILING, Round, UpdateRecord, robust_loss
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.envelope import Envelope, sha256_hex
from loracommons.protocol.errors import Reason
from loracommons.protocol.identity import SigningKey

from .conftest import Signer, make_global, make_update


def _cfg(mode="ffa", min_volunteers=2, **agg) -> ProjectConfig:
    base = ProjectConfig()
    return ProjectConfig(
        round=dataclasses.replace(base.round, volunteers_per_round=10, min_volunteers=min_volunteers),
        aggregation=dataclasses.replace(base.aggregation, mode=mode, **agg),
    )


def _round(cfg, g, **kwargs) -> tuple[Round, Signer]:
    signer = Signer(cfg, g)
    return Round(cfg, signer.round, signer.nonce, g, signer.digest, **kwargs), signer


def test_round_admits_caps_and_aggregates(rng):
    g = make_global(rng)
    cfg = _cfg(max_examples_weight=100)
    rnd, signer = _round(cfg, g)
    assert rnd.task_bytes == signer.task.to_bytes() and not rnd.buffers
    updates = [make_update(g, "ffa", rng) for _ in range(2)]
    plain = rnd.offer(signer.envelope(updates[0], examples=40))
    greedy = rnd.offer(signer.envelope(updates[1], examples=10**9))
    assert plain.accepted and plain.outcome == "admitted" and plain.store_reason == ""
    assert plain.weight == 40 and plain.examples == 40 and plain.nbytes > 0 and plain.signer
    assert greedy.accepted and greedy.capped and greedy.examples == 100 and greedy.weight == 100
    assert greedy.store_reason == Reason.WEIGHT_CAPPED and "counted as 100" in greedy.message
    assert greedy.note(1) == {"round": 1, "outcome": "admitted", "reason": "accepted",
                              "digest": greedy.update_digest[:16]}
    fields = greedy.store_fields()
    assert fields["reason"] == "weight_capped" and fields["public_key"] == greedy.public_key
    result = rnd.close()
    assert result.status == "aggregated" and result.aggregated == (plain.update_digest, greedy.update_digest)
    assert result.annotations == () and result.clip_bound is None and result.rejected == ()
    name = next(n for n in g if ".lora_B." in n)
    want = (40 * updates[0][name].astype(np.float64) + 100 * updates[1][name]) / 140
    np.testing.assert_allclose(result.tensors[name], want, rtol=1e-5, atol=1e-6)
    assert "total_weight=140" in result.note
    with pytest.raises(RuntimeError, match="closed"):
        rnd.offer(signer.envelope(updates[0]))


def test_round_refuses_without_raising(rng):
    g = make_global(rng)
    rnd, signer = _round(_cfg(min_volunteers=3), g)
    key = SigningKey.generate()
    first = rnd.offer(signer.envelope(make_update(g, "ffa", rng), key=key))
    twin = rnd.offer(signer.envelope(make_update(g, "ffa", rng), key=key))
    stale = rnd.offer(signer.envelope(make_update(g, "ffa", rng), nonce="cd" * 16))
    garbage = rnd.offer(Envelope(b"{", b"", b""))
    wrong_types = rnd.offer(Envelope(None, None, None))  # type: ignore[arg-type]
    assert first.accepted
    assert (twin.reason, stale.reason, garbage.reason) == ("duplicate_signer", "wrong_nonce", "malformed")
    assert wrong_types.reason == "malformed" and wrong_types.nbytes == 0
    assert not any(r.accepted for r in (twin, stale, garbage)) and twin.weight == 0
    assert twin.store_reason == "duplicate_signer" and twin.note(1)["outcome"] == "rejected"
    result = rnd.close()
    assert result.tensors is None and result.status == "skipped" and result.reason == "too_few"
    assert "3 required" in result.note


def test_round_internal_error_is_a_record(rng, monkeypatch):
    g = make_global(rng)
    rnd, signer = _round(_cfg(), g)

    def broken(verdict):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(rnd.aggregator, "offer", broken)
    record = rnd.offer(signer.envelope(make_update(g, "ffa", rng)))
    assert not record.accepted and record.reason == Reason.INTERNAL_ERROR and "boom" in record.message
    assert UpdateRecord.failed(Reason.VOLUNTEER_ERROR, "oom").store_reason == "volunteer_error"


def test_round_reports_clipping_and_rule_rejections(rng, tmp_path):
    g = make_global(rng)
    cfg = _cfg(min_volunteers=3, clip="median", free_rider_ratio=0.2)
    rnd, signer = _round(cfg, g, spill_dir=tmp_path / "spill")
    assert rnd.buffers
    honest = [rnd.offer(signer.envelope(make_update(g, "ffa", rng))) for _ in range(4)]
    attack = {n: g[n] + 100 * (v - g[n]) for n, v in make_update(g, "ffa", rng).items()}
    big = rnd.offer(signer.envelope(attack))
    lazy = rnd.offer(signer.envelope({n: g[n].copy() for n in attack}))
    assert all(r.accepted for r in [*honest, big, lazy])
    result = rnd.close()
    assert [(r.update_digest, r.reason) for r in result.rejected] == [(lazy.update_digest, "free_rider")]
    assert [a.update_digest for a in result.annotations] == [big.update_digest]
    assert result.annotations[0].reason == "clipped"
    assert result.clip_bound == result.metrics["clip_bound"]
    assert f"clip bound {result.clip_bound:.4g}" in result.annotations[0].message
    assert list((tmp_path / "spill").iterdir()) == []


def test_round_under_dp_annotates_with_the_fixed_bound(rng):
    g = make_global(rng)
    base = _cfg()
    cfg = dataclasses.replace(base, privacy=dataclasses.replace(base.privacy, dp=True, clip_norm=0.01))
    rnd, signer = _round(cfg, g, rng=np.random.default_rng(0))
    records = [rnd.offer(signer.envelope(make_update(g, "ffa", rng), examples=50)) for _ in range(3)]
    assert all(r.weight == 1.0 for r in records)  # uniform weights under dp
    result = rnd.close()
    assert result.clip_bound == 0.01 and len(result.annotations) == 3
    assert sha256_hex(encode_tensors(result.tensors)) != signer.digest


@pytest.mark.parametrize("hostile", [1e9, -1e6, float("inf"), float("nan"), None])
def test_robust_loss_is_a_bounded_median(hostile):
    honest = [2.0, 2.1, 2.2, 2.3]
    moved = robust_loss([*honest, hostile])
    assert abs(moved - robust_loss(honest)) < max(honest) - min(honest)
    assert robust_loss([]) is None and robust_loss([None]) is None
    assert robust_loss([-5.0]) == 0.0 and robust_loss([1e9]) == LOSS_CEILING


def test_round_reports_median_losses_of_the_updates_it_kept(rng):
    g = make_global(rng)
    rnd, signer = _round(_cfg(), g)
    for train, evaluation in [(1.0, 3.0), (2.0, None), (1e9, 1e9), (1.5, 2.0)]:
        scored = {} if evaluation is None else {"eval_loss": evaluation, "eval_tokens": 50}
        record = rnd.offer(signer.envelope(make_update(g, "ffa", rng), train_loss=train, **scored))
        assert record.accepted and record.eval_loss == evaluation
    result = rnd.close()
    assert result.train_loss == pytest.approx(1.75) and result.eval_loss == pytest.approx(3.0)
