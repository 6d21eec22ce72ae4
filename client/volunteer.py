"""One volunteer's side of a round: global adapter + task in, signed envelope out.

The node runner calls `Volunteer.run_round` for every training message. Data is
read and validated once, when the node starts (a malformed file stops `join`
before any model loads); the base model is loaded on the first round and kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loracommons.client.data import TokenizedData, load_records, split_heldout, tokenize
from loracommons.protocol.codec import encode_tensors, round_tensors
from loracommons.protocol.downlink import Downlink, Held, rebuild
from loracommons.protocol.envelope import Envelope, sign_update
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask, TrainSettings

log = logging.getLogger(__name__)

MIN_EVAL_EXAMPLES = 4
"""Held-out examples below which a volunteer signs no evaluation (a loss over fewer says little)."""

HELD_VERSIONS = 2
_HELD: dict[str, Held] = {}
"""Global adapters rebuilt and checked in this process, by digest (the most recent last): what a
delta applies to. Per process, not per volunteer: virtual volunteers of a rehearsal share one."""

#: Status callback: (state, details). States: training, sent, failed.
OnStatus = Callable[[str, dict], None]


class VolunteerError(RuntimeError):
    """A round cannot be done as asked; the reason goes back to the coordinator."""


DEFAULT_MAX_STEPS = 10_000
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_SEQ_LEN = 4096
"""A volunteer's own caps on a task (`join --max-steps-per-round` ...): what a task asks beyond
them is cut down to them, so a coordinator cannot make a node train for ever or run out of memory."""


@dataclass(frozen=True)
class NodeSettings:
    data_path: str
    identity_path: str
    device: str = "auto"
    max_minutes: float | None = None
    """This volunteer's own cap on minutes of training per round (None: the project's)."""
    heldout_fraction: float = 0.1
    threads: int | None = None
    """torch CPU threads while training (None: torch's default)."""
    max_steps: int = DEFAULT_MAX_STEPS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN

    def cap(self, train: TrainSettings) -> TrainSettings:
        """`train` within this volunteer's caps (each field the smaller of the task's and the cap)."""
        caps = {"max_steps": self.max_steps, "batch_size": self.max_batch_size, "seq_len": self.max_seq_len,
                "max_minutes": self.max_minutes}
        return dataclasses.replace(train, **{name: min(getattr(train, name), cap)
                                             for name, cap in caps.items() if cap is not None})


class Volunteer:
    def __init__(self, settings: NodeSettings, on_status: OnStatus | None = None):
        self.settings = settings
        self.key = SigningKey.load(settings.identity_path)
        self.records = load_records(settings.data_path)  # fails fast on a malformed file
        self.on_status = on_status or (lambda state, details: None)
        self._tokenized: tuple[tuple, tuple[TokenizedData, TokenizedData | None]] | None = None
        self._initial: tuple[tuple, dict[str, np.ndarray]] | None = None  # version 0, from the seed

    @property
    def held(self) -> Held | None:
        """The last global adapter rebuilt and checked in this process (what a delta applies to)."""
        return next(reversed(_HELD.values()), None)

    @property
    def fingerprint(self) -> str:
        return self.key.public.fingerprint

    def run_round(self, task: RoundTask, adapter_bytes: bytes, downlink: Downlink | None = None) -> Envelope:
        """Train on local data from the global adapter and sign the update."""
        from loracommons.client.evaluate import scored_loss
        from loracommons.client.model import apply_adapter, load_base
        from loracommons.client.trainer import train

        global_adapter = self.receive(task, adapter_bytes, downlink)
        # the revision the update signs (load_base ignores it for a local folder)
        base, tokenizer = load_base(task.base_model_id, task.base_model_revision or None,
                                    device=self.settings.device)
        model = apply_adapter(base, task.lora, dict(global_adapter), task.mode)
        data, heldout = self._tokenize(tokenizer, task)
        settings = self.settings.cap(task.train)
        capped = {name: [getattr(task.train, name), getattr(settings, name)]
                  for name in ("max_steps", "batch_size", "seq_len")
                  if getattr(settings, name) != getattr(task.train, name)}
        if capped:
            self.on_status("capped", {"round": task.round, "fields": capped})
        # A different sample order per volunteer and round, reproducible from the task.
        settings = dataclasses.replace(
            settings, seed=settings.seed + 1000 * task.round + int(self.fingerprint[:4], 16)
        )
        # Federated evaluation: the adapter as received, scored on this volunteer's held-out split and
        # signed with the update; the coordinator takes the median as the round's eval loss.
        evaluated: dict[str, float | int] = {}
        if heldout is not None and heldout.examples >= MIN_EVAL_EXAMPLES:
            loss, tokens = scored_loss(model, heldout, settings.batch_size)
            if tokens > 0 and math.isfinite(loss):
                evaluated = {"eval_loss": loss, "eval_tokens": tokens}
        started = time.monotonic()

        def on_step(step: int, max_steps: int, loss: float, tokens_per_s: float) -> None:
            self.on_status("training", {"round": task.round, "step": step, "max_steps": max_steps,
                                        "loss": loss, "tokens_per_s": tokens_per_s})

        self.on_status("training", {"round": task.round, "step": 0, "max_steps": settings.max_steps})
        result = train(model, tokenizer, data, settings, task.mode, heldout=heldout, on_step=on_step,
                       payload_dtype=task.payload_dtype, threads=self.settings.threads)
        payload = encode_tensors(result.update, dtype=task.payload_dtype)
        envelope = sign_update(
            self.key, payload, **task.claims(),
            examples=result.examples, steps=result.steps, train_loss=result.train_loss, **evaluated,
        )
        self.on_status("sent", {"round": task.round, "steps": result.steps, "train_loss": result.train_loss,
                                "eval_loss": result.eval_loss, "seconds": time.monotonic() - started,
                                "bytes": len(payload) + len(envelope.manifest), "digest": envelope.digest})
        return envelope

    def receive(self, task: RoundTask, data: bytes,
                downlink: Downlink | None = None) -> dict[str, np.ndarray]:
        """The task's global adapter rebuilt from its downlink (`protocol/downlink.py`) and checked
        against the task's digest; `VolunteerError` naming the reason code otherwise (nothing trains)."""
        link = downlink or Downlink()
        try:
            full = rebuild(link, data, mode=task.mode, digest=task.base_adapter_digest,
                           max_bytes=task.max_payload_bytes * 2 + (1 << 20), held=_HELD.get(link.delta_from),
                           regenerate=lambda: self.initial_adapter(task))
        except ProtocolError as exc:  # the code leads the line: the coordinator records it (Reason)
            raise VolunteerError(f"{exc.reason}: {exc}") from None
        _HELD.pop(task.base_adapter_digest, None)
        _HELD[task.base_adapter_digest] = Held(task.base_adapter_digest, full)
        while len(_HELD) > HELD_VERSIONS:
            del _HELD[next(iter(_HELD))]
        return full

    def initial_adapter(self, task: RoundTask) -> Mapping[str, np.ndarray]:
        """Version 0 from the task's seed, as the coordinator made it, rounded to the downlink dtype;
        kept for the life of the node (one float32 load of the base on the CPU, once per project)."""
        from loracommons.protocol.lora import initial_adapter_for

        key = (task.base_model_id, task.base_model_revision, task.adapter_seed, task.lora,
               task.downlink_dtype)
        if self._initial is None or self._initial[0] != key:
            made = initial_adapter_for(task.base_model_id, task.base_model_revision or None, task.lora,
                                       task.adapter_seed)
            self._initial = key, round_tensors(made, task.downlink_dtype)
        return self._initial[1]

    def _tokenize(self, tokenizer: object, task: RoundTask) -> tuple[TokenizedData, TokenizedData | None]:
        """Training and held-out tokens; the same every round of a project, so made once."""
        seq_len = min(task.train.seq_len, self.settings.max_seq_len)
        key = (id(tokenizer), task.base_model_id, task.train.seed, seq_len)
        if self._tokenized is None or self._tokenized[0] != key:
            train_records, heldout_records = split_heldout(
                self.records, self.settings.heldout_fraction, task.train.seed
            )
            data = tokenize(train_records, tokenizer, seq_len)
            heldout = tokenize(heldout_records, tokenizer, seq_len) if heldout_records else None
            self._tokenized = key, (data, heldout)
        return self._tokenized[1]


def load_volunteer(node_config: dict, on_status: OnStatus | None = None) -> Volunteer:
    """Build a `Volunteer` from the SuperNode's node config (set by `loracommons join`)."""
    try:
        max_minutes = float(node_config["max-minutes"]) if node_config.get("max-minutes") else None
        threads = int(node_config["threads"]) if node_config.get("threads") else None
        caps = {name: int(node_config[key]) for key, name in (
            ("max-steps", "max_steps"), ("max-batch-size", "max_batch_size"), ("max-seq-len", "max_seq_len"))
            if node_config.get(key)}
        if any(value < 1 for value in caps.values()):
            raise ValueError(f"caps must be at least 1, got {caps}")
        settings = NodeSettings(
            data_path=str(Path(str(node_config["data-path"])).expanduser()),
            identity_path=str(Path(str(node_config["identity"])).expanduser()),
            device=str(node_config.get("device", "auto")),
            max_minutes=max_minutes,
            threads=threads,
            **caps,
        )
    except KeyError as exc:
        raise VolunteerError(f"node config lacks {exc}; start the node with `loracommons join`") from None
    except ValueError as exc:
        raise VolunteerError(f"node config has a bad value ({exc}); start the node with `loracommons join`"
                             ) from None
    return Volunteer(settings, on_status)
