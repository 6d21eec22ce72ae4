"""A hostile volunteer node for tests: the real `loracommons join` with one thing changed.

    python tests/security/hostile_node.py MODE join HOST:PORT --data D --identity K --insecure ...

It wraps `Volunteer.run_round` (which the node runner calls in this very process
for every round) so that the envelope the real client built is changed in one
way, or, for behaviours that never train (free rider, sybil), replaced by the
update such a volunteer would send; then it runs the `loracommons` CLI with the
remaining arguments, exactly as `loracommons join` does. Everything else (the
SuperNode, the runner that checks the app bundle, the Flower messages) is the
real client.

Modes (MODES below) and what each changes:
    forged_signature  flips a bit of the signature
    unregistered_key  re-signs with a fresh key no operator registered
    twin              re-signs with another volunteer's key (env LC_HOSTILE_KEY): two envelopes
                      signed by one key in one round, sent by two nodes
    replay            from its second round on, sends its first round's envelope again
    wrong_project     re-signs the envelope for another project id
    stale_nonce       re-signs with the nonce of its previous round (or a made-up one)
    nonfinite         NaN in a tensor (odd rounds), +Inf (even rounds)
    bad_tensor        a renamed tensor (odd rounds), a tensor with a row missing (even rounds)
    oversize          adds a 4 MiB tensor to the payload
    pickle            sends a pickle (that would create the file LC_HOSTILE_MARKER) as payload
    scaled            model replacement: the honest delta times 100
    inflated          claims 10**9 training examples
    free_rider        trains nothing: the global adapter plus noise of std 1e-6
    sybil             trains nothing: one crafted update (global + 50 x a fixed unit direction),
                      byte-identical on every node that runs this mode
    slow              sleeps LC_HOSTILE_SLEEP seconds before its first round (a straggler)
    late_overflow     a straggler like `slow` whose late round-1 reply's manifest carries a 400-digit
                      train_loss, unsigned (issue 15, item 1: it once stopped the coordinator)
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import secrets
import signal
import sys
import time

import numpy as np

from loracommons.client import volunteer as volunteer_module
from loracommons.protocol import modes
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.downlink import Downlink
from loracommons.protocol.envelope import Envelope, sign_update
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask

_real_run_round = volunteer_module.Volunteer.run_round
_state: dict = {"rounds": 0}


def claims_of(envelope: Envelope) -> dict:
    """The sender-set manifest fields of an envelope (what `sign_update` takes)."""
    claims = json.loads(envelope.manifest)
    for derived in ("format_version", "payload_sha256", "payload_bytes", "signer"):
        claims.pop(derived)
    return claims


def resign(key: SigningKey, envelope: Envelope, payload: bytes | None = None, **changes: object) -> Envelope:
    return sign_update(key, envelope.payload if payload is None else payload,
                       **{**claims_of(envelope), **changes})


def tensors_of(envelope: Envelope) -> dict[str, np.ndarray]:
    raw = decode_tensors(envelope.payload, max_bytes=1 << 30, require_finite=False)
    return {name: np.array(value, dtype=np.float32) for name, value in raw.items()}


def global_sent(volunteer, task: RoundTask, adapter_bytes: bytes,  # noqa: ANN001
                downlink: Downlink | None) -> dict[str, np.ndarray]:
    """The global adapter's tensors that an update carries in this round's mode (rebuilt from the
    task's downlink as an honest volunteer rebuilds it)."""
    adapter = volunteer.receive(task, adapter_bytes, downlink)
    return {n: np.array(adapter[n], dtype=np.float32) for n in modes.get(task.mode).sent_names(adapter)}


def untrained(volunteer, task: RoundTask, tensors: dict[str, np.ndarray]) -> Envelope:  # noqa: ANN001
    """Sign `tensors` with honest-looking claims, as a volunteer that skipped training would."""
    payload = encode_tensors(tensors, dtype=task.payload_dtype)
    return sign_update(volunteer.key, payload, **task.claims(), examples=len(volunteer.records),
                       steps=task.train.max_steps, train_loss=2.0)


class _Pwn:
    """Unpickling this would run a command: proof that the coordinator never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def run_round(self, task: RoundTask, adapter_bytes: bytes,  # noqa: ANN001
              downlink: Downlink | None = None) -> Envelope:
    mode = _state["mode"]
    _state["rounds"] += 1
    odd = _state["rounds"] % 2 == 1
    if mode == "free_rider":
        rng = np.random.default_rng(_state["rounds"])
        sent = global_sent(self, task, adapter_bytes, downlink)
        return untrained(self, task, {n: v + rng.normal(0, 1e-6, v.shape).astype(np.float32)
                                      for n, v in sent.items()})
    if mode == "sybil":
        sent = global_sent(self, task, adapter_bytes, downlink)
        rng = np.random.default_rng(1234)  # the same direction on every sybil
        direction = {n: rng.standard_normal(v.shape) for n, v in sorted(sent.items())}
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in direction.values()))
        return untrained(self, task, {n: (sent[n] + 50.0 * d / norm).astype(np.float32)
                                      for n, d in direction.items()})
    if mode == "replay" and "first" in _state:
        return _state["first"]
    if mode in ("slow", "late_overflow") and _state["rounds"] == 1:
        print(f"hostile: round {task.round}: holding the task, sleeping {os.environ['LC_HOSTILE_SLEEP']} s",
              flush=True)  # a test can aim a kill at this point
        time.sleep(float(os.environ["LC_HOSTILE_SLEEP"]))
    envelope = _real_run_round(self, task, adapter_bytes, downlink)
    previous_nonce = _state.get("nonce")
    _state["nonce"] = task.nonce
    if mode in ("slow", "honest"):
        return envelope
    if mode == "late_overflow":
        if _state["rounds"] > 1:
            return envelope
        manifest = canonical_json({**json.loads(envelope.manifest), "train_loss": "@@"})
        return Envelope(manifest.replace(b'"@@"', b"1" * 400), envelope.payload, b"\0" * 64)
    if mode == "replay":
        _state["first"] = envelope
        return envelope
    if mode == "forged_signature":
        signature = bytearray(envelope.signature)
        signature[-1] ^= 0x01
        return Envelope(envelope.manifest, envelope.payload, bytes(signature))
    if mode == "unregistered_key":
        _state.setdefault("key", SigningKey.generate("volunteer"))
        return resign(_state["key"], envelope)
    if mode == "twin":
        return resign(SigningKey.load(os.environ["LC_HOSTILE_KEY"]), envelope)
    if mode == "wrong_project":
        return resign(self.key, envelope, project_id=task.project_id + "-elsewhere")
    if mode == "future_base":  # async: names a task (and so a base) the coordinator has not issued
        return resign(self.key, envelope, round=task.round + 1000)
    if mode == "stale_nonce":
        return resign(self.key, envelope, nonce=previous_nonce or secrets.token_hex(16))
    if mode == "inflated":
        return resign(self.key, envelope, examples=10**9)
    tensors = tensors_of(envelope)
    first = sorted(tensors)[0]
    if mode == "nonfinite":
        tensors[first][0, 0] = np.nan if odd else np.inf
    elif mode == "bad_tensor":
        if odd:
            tensors[first.replace("q_proj", "k_proj").replace("v_proj", "k_proj")] = tensors.pop(first)
        else:
            tensors[first] = tensors[first][:-1]
    elif mode == "oversize":
        tensors["padding"] = np.zeros(1 << 20, dtype=np.float32)
    elif mode == "scaled":
        sent = global_sent(self, task, adapter_bytes, downlink)
        tensors = {n: sent[n] + 100.0 * (v - sent[n]) for n, v in tensors.items()}
    elif mode == "pickle":
        payload = pickle.dumps({"weights": _Pwn(os.environ["LC_HOSTILE_MARKER"])})
        return resign(self.key, envelope, payload)
    else:
        raise SystemExit(f"unknown hostile mode {mode!r}")
    return resign(self.key, envelope, encode_tensors(tensors, dtype=task.payload_dtype))


MODES = ("honest", "forged_signature", "unregistered_key", "twin", "replay", "wrong_project", "stale_nonce",
         "nonfinite", "bad_tensor", "oversize", "pickle", "scaled", "inflated", "free_rider", "sybil", "slow",
         "late_overflow", "future_base")


def main(argv: list[str]) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: stacks into the log
    if not argv or argv[0] not in MODES:
        raise SystemExit(f"usage: hostile_node.py MODE join ...; MODE one of {', '.join(MODES)}")
    _state["mode"] = argv[0]
    volunteer_module.Volunteer.run_round = run_round
    from loracommons.cli import app

    app(prog_name="loracommons", args=argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
