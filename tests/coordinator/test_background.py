"""The helper thread changes when work happens, never its outcome: verdicts and sums match inline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loracommons.coordinator import background
from loracommons.coordinator.admission import admit, context_for, expected_for
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.round import Round
from loracommons.protocol.envelope import Envelope

from .conftest import Signer, make_global, make_update


def _envelopes(cfg, g, rng) -> list[Envelope]:
    signer = Signer(cfg, g)
    good = [signer.envelope(make_update(g, cfg.aggregation.mode, rng), examples=7 * i + 1) for i in range(5)]
    nan = make_update(g, cfg.aggregation.mode, rng)
    next(iter(nan.values()))[0, 0] = np.nan
    wrong_shape = {n: v[:1] for n, v in make_update(g, cfg.aggregation.mode, rng).items()}
    tampered = signer.envelope(make_update(g, cfg.aggregation.mode, rng))
    tampered = Envelope(tampered.manifest, tampered.payload[:-4] + b"\0\0\0\0", tampered.signature)
    return [*good, signer.envelope(nan), signer.envelope(wrong_shape), tampered]


@pytest.mark.parametrize("mode", ["ffa", "exact"])
def test_helper_thread_gives_the_inline_verdicts_and_sums(rng, monkeypatch, mode):
    g = make_global(rng)
    base = ProjectConfig()
    cfg = dataclasses.replace(base, aggregation=dataclasses.replace(base.aggregation, mode=mode))
    envelopes = _envelopes(cfg, g, rng)
    outcomes = {}
    for cpus in (1, 2):
        monkeypatch.setattr(background, "CPUS", cpus)
        signer = Signer(cfg, g)
        ctx = context_for(cfg, expected_for(cfg, 1, signer.nonce, g, signer.digest), g)
        verdicts = [(v.reason, v.delta_norm) for v in (admit(e, ctx) for e in envelopes)]
        rnd = Round(cfg, 1, signer.nonce, g, signer.digest)
        records = [rnd.offer(e) for e in envelopes]
        outcomes[cpus] = verdicts, [r.reason for r in records], rnd.close().tensors
    (v1, r1, t1), (v2, r2, t2) = outcomes[1], outcomes[2]
    assert v1 == v2 and r1 == r2
    assert [reason for reason, _ in v1] == ["accepted"] * 5 + ["non_finite", "bad_tensor", "digest_mismatch"]
    for name in g:
        np.testing.assert_array_equal(t1[name], t2[name])  # same order of sums: bit for bit


def test_single_cpu_runs_inline(monkeypatch):
    monkeypatch.setattr(background, "CPUS", 1)
    assert background.helper() is None
    monkeypatch.setattr(background, "CPUS", 2)
    assert background.helper() is background.helper()
