"""Admission: every rejection reason reached by a crafted envelope; a valid one passes."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from loracommons.coordinator import admission
from loracommons.coordinator.admission import REASONS, admit, context_for, expected_for
from loracommons.coordinator.config import ProjectConfig, ProjectSection
from loracommons.protocol import errors
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.envelope import DOMAIN, Envelope
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.lora import take_rank, take_window, window_columns, window_start

from .conftest import Signer, make_global, make_update

KEY = SigningKey.generate()
OTHER = SigningKey.generate()


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(1)
    cfg = ProjectConfig(project=ProjectSection(id="proj-1"))
    g = make_global(rng)
    signer = Signer(cfg, g)
    expected = expected_for(cfg, signer.round, signer.nonce, g, signer.digest)
    return cfg, g, signer, expected


def _ctx(world, **changes):
    cfg, g, _, expected = world
    return dataclasses.replace(context_for(cfg, expected, g), **changes)


def _resign(env: Envelope, key: SigningKey, **fields) -> Envelope:
    """Rewrite manifest fields and sign again, as a peer could."""
    obj = {**json.loads(env.manifest), **fields}
    manifest = canonical_json(obj)
    return Envelope(manifest, env.payload, key.sign(DOMAIN + hashlib.sha256(manifest).digest()))


def _update(world, seed=2, **kw):
    _, g, signer, _ = world
    return signer.envelope(make_update(g, "ffa", np.random.default_rng(seed)), key=KEY, **kw)


def _with_value(world, value):
    _, g, signer, _ = world
    t = make_update(g, "ffa", np.random.default_rng(3))
    t[sorted(t)[-1]][-1, -1] = value
    return signer.envelope(t, key=KEY)


def _nan(world):
    return _with_value(world, np.nan)


def _payload_swap(world, payload: bytes) -> Envelope:
    """A validly signed envelope whose manifest pins `payload`."""
    env = _update(world)
    return _resign(
        Envelope(env.manifest, payload, env.signature),
        KEY,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
    )


def _tensors(world, drop=False, shape=False):
    _, g, _, _ = world
    t = make_update(g, "ffa", np.random.default_rng(4))
    name = sorted(t)[0]
    if drop:
        del t[name]
    if shape:
        t[name] = np.zeros((t[name].shape[0], t[name].shape[1] + 1), np.float32)
    return t


def _at_rank(world, rank, declared):
    """A validly signed update carrying `rank` columns of each B, declaring `declared` (None: nothing)."""
    _, g, signer, _ = world
    t = take_rank(make_update(g, "ffa", np.random.default_rng(5)), rank)
    claims = {} if declared is None else {"rank": declared}
    return signer.envelope({n: np.ascontiguousarray(v) for n, v in t.items()}, key=KEY, **claims)


NOT_NESTED = "mode = 'exact' folds only the project's rank (nested ranks: ffa)"


def _encoded(tensors, dtype="float32"):
    from loracommons.protocol.codec import encode_tensors

    return encode_tensors(tensors, dtype=dtype)


def _flip_sig(env: Envelope) -> Envelope:
    sig = bytearray(env.signature)
    sig[-1] ^= 1
    return Envelope(env.manifest, env.payload, bytes(sig))


# case id -> (build envelope, context changes, expected reason)
CASES = {
    "valid": (lambda w: _update(w), {}, "accepted"),
    "payload_too_large": (
        lambda w: Envelope(_update(w).manifest, b"\0" * (w[3].max_payload_bytes + 1), _update(w).signature),
        {},
        "too_large",
    ),
    "manifest_too_large": (lambda w: Envelope(b" " * 20000, b"", b""), {}, "too_large"),
    "signature_too_large": (
        lambda w: Envelope(_update(w).manifest, _update(w).payload, b"s" * 300),
        {},
        "too_large",
    ),
    "not_json": (lambda w: Envelope(b"{not json", b"", b"sig"), {}, "malformed"),
    "not_canonical": (
        lambda w: Envelope(_update(w).manifest + b" ", _update(w).payload, b"sig"),
        {},
        "malformed",
    ),
    "unknown_field": (lambda w: _resign(_update(w), KEY, extra=1), {}, "unknown_field"),
    "missing_field": (
        lambda w: Envelope(
            canonical_json({k: v for k, v in json.loads(_update(w).manifest).items() if k != "nonce"}),
            b"",
            b"sig",
        ),
        {},
        "missing_field",
    ),
    "future_version": (lambda w: _resign(_update(w), KEY, format_version=2), {}, "unsupported_version"),
    "bad_key": (lambda w: _resign(_update(w), KEY, signer="ssh-rsa AAAA"), {}, "bad_key"),
    "bad_signature": (lambda w: _flip_sig(_update(w)), {}, "bad_signature"),
    "forged_signer": (
        lambda w: _resign(_resign(_update(w), KEY, signer=OTHER.public.openssh), KEY),
        {},
        "bad_signature",
    ),
    "banned": (lambda w: _update(w), {"banned": frozenset({KEY.public.fingerprint})}, "banned"),
    "not_registered": (
        lambda w: _update(w),
        {"membership": "allowlist", "allowlist": frozenset({"00"})},
        "not_registered",
    ),
    "duplicate_signer": (lambda w: _update(w), {"admitted": {KEY.public.fingerprint}}, "duplicate_signer"),
    "wrong_project": (lambda w: _update(w, project_id="other"), {}, "wrong_project"),
    "wrong_round": (lambda w: _update(w, round=0), {}, "wrong_round"),
    "wrong_nonce": (lambda w: _update(w, nonce="cd" * 16), {}, "wrong_nonce"),
    "wrong_base_adapter": (lambda w: _update(w, base_adapter_digest="0" * 64), {}, "wrong_base"),
    "wrong_base_model": (lambda w: _update(w, base_model_id="gpt2"), {}, "wrong_base"),
    "wrong_lora_config": (lambda w: _update(w, lora_config_digest="1" * 64), {}, "wrong_base"),
    "wrong_dtype": (lambda w: _update(w, dtype="float16"), {}, "wrong_dtype"),
    "no_examples": (lambda w: _update(w, examples=0), {}, "no_examples"),
    "tampered_payload": (
        lambda w: Envelope(_update(w).manifest, _update(w, seed=9).payload, _update(w).signature),
        {},
        "digest_mismatch",
    ),
    "not_safetensors": (lambda w: _payload_swap(w, b"\x05" * 64), {}, "bad_tensor"),
    "missing_tensor": (lambda w: _payload_swap(w, _encoded(_tensors(w, drop=True))), {}, "bad_tensor"),
    "wrong_shape": (lambda w: _payload_swap(w, _encoded(_tensors(w, shape=True))), {}, "bad_tensor"),
    "tensor_dtype": (lambda w: _payload_swap(w, _encoded(_tensors(w), "float16")), {}, "bad_tensor"),
    "extra_tensor_A_in_ffa": (
        lambda w: _payload_swap(
            w, _encoded({**_tensors(w), **{n: v for n, v in w[1].items() if ".lora_A." in n}})
        ),
        {},
        "bad_tensor",
    ),
    "nan": (_nan, {}, "non_finite"),
    "inf": (lambda w: _with_value(w, -np.inf), {}, "non_finite"),
    # finite, but its square overflows float32: the norm is redone in float64, not called NaN
    "huge_finite": (lambda w: _with_value(w, 3e38), {}, "accepted"),
    "huge_finite_bounded": (lambda w: _with_value(w, 3e38), {"max_norm": 1e30}, "norm_too_large"),
    "norm_too_large": (lambda w: _update(w), {"max_norm": 1e-3}, "norm_too_large"),
    # nested ranks (the world's project rank is 4)
    "rank_2_declared": (lambda w: _at_rank(w, 2, 2), {}, "accepted"),
    "rank_4_declared": (lambda w: _at_rank(w, 4, 4), {}, "accepted"),
    "more_columns_than_declared": (lambda w: _at_rank(w, 4, 2), {}, "rank_mismatch"),
    "fewer_columns_than_declared": (lambda w: _at_rank(w, 2, 3), {}, "rank_mismatch"),
    "narrow_undeclared": (lambda w: _at_rank(w, 2, None), {}, "rank_mismatch"),
    "rank_above_project": (lambda w: _at_rank(w, 4, 5), {}, "bad_rank"),
    "rank_zero": (lambda w: _at_rank(w, 4, 0), {}, "bad_rank"),
    "rank_negative": (lambda w: _at_rank(w, 4, -1), {}, "bad_rank"),
    "narrow_where_refused": (
        lambda w: _at_rank(w, 2, 2), {"nested_refusal": NOT_NESTED}, "rank_not_supported"
    ),
    "full_declared_where_refused": (lambda w: _at_rank(w, 4, 4), {"nested_refusal": NOT_NESTED}, "accepted"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_envelope_gets_its_reason(world, case):
    build, changes, reason = CASES[case]
    env = build(world)
    verdict = admit(env, _ctx(world, **changes))
    assert (verdict.reason, verdict.accepted) == (reason, reason == "accepted"), verdict.message
    assert verdict.update_digest == hashlib.sha256(env.manifest).hexdigest()
    record = verdict.record()
    assert record["reason"] == reason and record["update_digest"] == verdict.update_digest
    if reason == "accepted":
        assert verdict.signer == KEY.public.fingerprint
        assert set(verdict.tensors) == {n for n in world[1] if ".lora_B." in n}
        assert verdict.delta_norm > 0 and verdict.without_tensors().tensors is None
    else:
        assert verdict.tensors is None and verdict.message


def test_every_reason_code_is_reached():
    reached = {reason for _, _, reason in CASES.values()}
    update_reasons = {
        c.reason
        for c in (
            errors.TooLarge,
            errors.Malformed,
            errors.UnknownField,
            errors.MissingField,
            errors.UnsupportedVersion,
            errors.BadSignature,
            errors.BadKey,
            errors.WrongProject,
            errors.WrongRound,
            errors.WrongNonce,
            errors.WrongBase,
            errors.DigestMismatch,
            errors.BadTensor,
            errors.NonFinite,
        )
    }
    assert (set(REASONS) - {"internal_error"}) | update_reasons <= reached


def test_signer_attributed_only_after_signature(world):
    env = _resign(_update(world), KEY, project_id="other")
    verdict = admit(env, _ctx(world))
    assert verdict.reason == "wrong_project" and verdict.signer == KEY.public.fingerprint
    assert admit(_flip_sig(_update(world)), _ctx(world)).signer is None


def test_valid_update_tensors_and_norm(world):
    cfg, g, signer, _ = world
    tensors = make_update(g, "ffa", np.random.default_rng(5))
    verdict = admit(signer.envelope(tensors, key=KEY), _ctx(world))
    assert verdict.accepted and set(verdict.tensors) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(verdict.tensors[name], value)
    want = np.sqrt(sum(np.sum((tensors[n].astype(np.float64) - g[n]) ** 2) for n in tensors))
    assert verdict.delta_norm == pytest.approx(want)


@pytest.mark.parametrize("value", [np.nan, np.inf, 3e38])
def test_exact_mode_finiteness_from_the_norm(rng, value):
    cfg = dataclasses.replace(
        ProjectConfig(), aggregation=dataclasses.replace(ProjectConfig().aggregation, mode="exact")
    )
    g = make_global(rng)
    signer = Signer(cfg, g)
    tensors = make_update(g, "exact", rng)
    name = next(n for n in sorted(tensors) if ".lora_A." in n)
    tensors[name][0, 0] = value
    expected = expected_for(cfg, 1, signer.nonce, g, signer.digest)
    verdict = admit(signer.envelope(tensors), context_for(cfg, expected, g))
    if np.isfinite(value):
        assert verdict.accepted and np.isfinite(verdict.delta_norm) and verdict.delta_norm > 1e37
    else:
        assert verdict.reason == "non_finite" and name in verdict.message


def test_exact_mode_norm_is_product_space(rng):
    cfg = dataclasses.replace(
        ProjectConfig(), aggregation=dataclasses.replace(ProjectConfig().aggregation, mode="exact")
    )
    g = make_global(rng)
    signer = Signer(cfg, g)
    tensors = make_update(g, "exact", rng)
    expected = expected_for(cfg, 1, signer.nonce, g, signer.digest)
    verdict = admit(signer.envelope(tensors), context_for(cfg, expected, g))
    assert verdict.accepted
    total = 0.0
    for name in g:
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            d = tensors[b].astype(np.float64) @ tensors[name] - g[b].astype(np.float64) @ g[name]
            total += np.sum(d**2)
    assert verdict.delta_norm == pytest.approx(np.sqrt(total), rel=1e-9)


def test_bug_in_admission_is_a_rejection_not_a_crash(world, monkeypatch, caplog):
    def broken(*_a, **_k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(admission, "delta_norm", broken)
    verdict = admit(_update(world), _ctx(world))
    assert (verdict.accepted, verdict.reason) == (False, "internal_error")
    assert "oops" in caplog.text


def test_payload_limit_is_the_spec_size(world):
    cfg, g, signer, expected = world
    assert expected.max_payload_bytes < cfg.limits.max_payload_bytes
    assert len(_update(world).payload) <= expected.max_payload_bytes


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"aggregation": {"mode": "ffa"}}, ""),
        ({"aggregation": {"mode": "ffa", "clip": "median"}, "round": {"min_volunteers": 2}}, ""),
        ({"aggregation": {"mode": "exact"}}, "mode = 'exact'"),
        ({"aggregation": {"mode": "fedavg"}}, "mode = 'fedavg'"),
        ({"aggregation": {"mode": "ffa", "robust": "trimmed_mean", "trim_fraction": 0.2},
          "round": {"min_volunteers": 5, "volunteers_per_round": 5}}, "robust = 'trimmed_mean'"),
        ({"aggregation": {"mode": "ffa", "robust": "krum", "krum_f": 1},
          "round": {"min_volunteers": 5, "volunteers_per_round": 5}}, "robust = 'krum'"),
        ({"privacy": {"dp": True, "clip_norm": 1.0, "noise_multiplier": 1.0}}, "[privacy] dp"),
    ],
)
def test_projects_that_cannot_fold_a_smaller_rank_refuse_it_and_say_why(world, settings, refusal):
    _, g, _, _ = world
    cfg = ProjectConfig.from_dict({"project": {"id": "proj-1"}, **settings})
    signer = Signer(cfg, g)
    expected = expected_for(cfg, signer.round, signer.nonce, g, signer.digest)
    ctx = context_for(cfg, expected, g)
    assert ctx.nested_refusal.startswith(refusal) if refusal else ctx.nested_refusal == ""
    narrow = take_rank(make_update(g, cfg.aggregation.mode, np.random.default_rng(6)), 2)
    env = signer.envelope({n: np.ascontiguousarray(v) for n, v in narrow.items()}, key=KEY, rank=2)
    verdict = admit(env, ctx)
    if refusal:
        assert verdict.reason == "rank_not_supported" and refusal in verdict.message
        assert "below the project's 4" in verdict.message
    else:
        assert verdict.accepted, verdict.message


def test_a_narrow_update_is_measured_against_its_own_columns(world):
    _, g, signer, _ = world
    t = make_update(g, "ffa", np.random.default_rng(7))
    r = next(v.shape[0] for n, v in g.items() if ".lora_A." in n)
    # a signer whose window this round is not the first columns (window_start: round and signer)
    key = next(k for k in iter(SigningKey.generate, None)
               if window_start(signer.round, 2, r, k.public.fingerprint))
    cols = window_columns(window_start(signer.round, 2, r, key.public.fingerprint), 2, r)
    narrow = {n: np.ascontiguousarray(v) for n, v in take_window(t, 2, int(cols[0])).items()}
    verdict = admit(signer.envelope(narrow, key=key, rank=2), _ctx(world))
    expected = np.sqrt(sum(np.sum((narrow[n] - g[n][:, cols]) ** 2) for n in narrow))
    assert verdict.accepted and verdict.delta_norm == pytest.approx(expected, rel=1e-5)
