"""One volunteer's side of a round: global adapter + task in, signed envelope out.

The node runner calls `Volunteer.run_round` for every training message. Data is
read and validated once, when the node starts (a malformed file stops `join`
before any model loads); the base model is loaded on the first round and kept.
With `[train] keep_optimizer`, the optimizer's state of the last round is kept
too and goes on in the next round if that round directly follows it (the global
adapter is then the version this volunteer's update went into) and the mode
keeps A frozen; otherwise the round starts a fresh optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loracommons.client.data import TokenizedData, load_records, split_heldout, tokenize
from loracommons.protocol import modes
from loracommons.protocol.codec import encode_tensors, round_tensors
from loracommons.protocol.downlink import Downlink, Held, rebuild
from loracommons.protocol.envelope import Envelope, sign_update
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask, TrainSettings

if TYPE_CHECKING:  # the trainer imports torch: loaded with the first round, not with the node
    from loracommons.client.trainer import Carry

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
    max_rank: int | None = None
    """This volunteer's cap on the LoRA rank it trains (`join --max-rank`; nested ranks, ffa only).
    None: the project's rank, or less where free GPU memory is short (`round_rank`)."""
    max_steps_per_second: float | None = None
    """This volunteer's pace cap (`join --max-steps-per-second`): a task of S steps takes at least S / cap
    seconds from its arrival (the adapter's decoding and scoring count, the training sleeps the rest), to
    share the machine with other work (None: as fast as it can)."""

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
        self._own_loss: tuple[tuple, float] | None = None
        """Held-out loss of the adapter this volunteer trained in its last round, with the key of the
        held-out split it was measured on (the per-volunteer answer compares it with the next
        community adapter's)."""
        self._carry: tuple[tuple[tuple, int, int | None, int], Carry | None] | None = None
        """((the settings the next task must match, its round, its base version, the first component of
        its window), the trainer's `Carry`) of the last task."""
        self._initial: tuple[tuple, dict[str, np.ndarray]] | None = None  # version 0, from the seed

    @property
    def held(self) -> Held | None:
        """The last global adapter rebuilt and checked in this process (what a delta applies to)."""
        return next(reversed(_HELD.values()), None)

    @property
    def fingerprint(self) -> str:
        return self.key.public.fingerprint

    def run_round(self, task: RoundTask, adapter_bytes: bytes, downlink: Downlink | None = None) -> Envelope:
        """Train on local data from the global adapter and sign the update; the whole round (the
        federated eval included, not only training) within the volunteer's `threads`."""
        from loracommons.client.trainer import torch_threads

        with torch_threads(self.settings.threads):
            return self._run_round(task, adapter_bytes, downlink)

    def _run_round(self, task: RoundTask, adapter_bytes: bytes, downlink: Downlink | None = None) -> Envelope:
        from loracommons.client.evaluate import scored_loss
        from loracommons.client.model import apply_adapter_at_rank, load_base
        from loracommons.client.trainer import train
        from loracommons.protocol.lora import window_start

        arrived = time.monotonic()  # the pace cap counts the whole task from here
        global_adapter = self.receive(task, adapter_bytes, downlink)
        # the revision the update signs (load_base ignores it for a local folder)
        base, tokenizer = load_base(task.base_model_id, task.base_model_revision or None,
                                    device=self.settings.device)
        rank = self._round_rank(task, base)
        start = window_start(task.round, rank, task.lora.r, self.fingerprint)  # nested ranks: its window
        model = apply_adapter_at_rank(base, task.lora, dict(global_adapter), task.mode, rank, start)
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
        # At a smaller rank too: the model computes the whole adapter (`apply_adapter_at_rank`).
        if heldout is not None and heldout.examples >= MIN_EVAL_EXAMPLES:
            loss, tokens = scored_loss(model, heldout, settings.batch_size)
            if tokens > 0 and math.isfinite(loss):
                evaluated = {"eval_loss": loss, "eval_tokens": tokens}
        started = time.monotonic()

        def on_step(step: int, max_steps: int, loss: float, tokens_per_s: float) -> None:
            self.on_status("training", {"round": task.round, "step": step, "max_steps": max_steps,
                                        "loss": loss, "tokens_per_s": tokens_per_s})

        self.on_status("training", {"round": task.round, "step": 0, "max_steps": settings.max_steps})
        carry = self._take_carry(task, start)
        result = train(model, tokenizer, data, settings, task.mode, heldout=heldout, on_step=on_step,
                       payload_dtype=task.payload_dtype, threads=self.settings.threads,
                       max_steps_per_second=self.settings.max_steps_per_second, carry=carry,
                       paced_since=arrived)
        if task.train.keep_optimizer and not modes.get(task.mode).trains("lora_A"):
            self._carry = ((_carry_key(task), task.round, task.base_version, start), result.carry)
        payload = encode_tensors(result.update, dtype=task.payload_dtype)
        envelope = sign_update(
            self.key, payload, **task.claims(),
            examples=result.examples, steps=result.steps, train_loss=result.train_loss, **evaluated,
            **({"rank": rank} if rank < task.lora.r else {}),
        )
        self.on_status("sent", {"round": task.round, "steps": result.steps, "train_loss": result.train_loss,
                                "eval_loss": result.eval_loss, "seconds": time.monotonic() - started,
                                "bytes": len(payload) + len(envelope.manifest), "digest": envelope.digest,
                                **self._compare(evaluated.get("eval_loss"), result.eval_loss)})
        return envelope

    def _compare(self, community: float | int | None, own: float | None) -> dict[str, float | None]:
        """This volunteer's own answer to "does joining help me?": the community adapter it received
        (`community_loss`) against the adapter it trained alone in its previous round (`own_loss`),
        both on its held-out split; then this round's own adapter becomes the one to beat."""
        assert self._tokenized is not None  # run_round tokenized before training
        split = self._tokenized[0]
        last = self._own_loss[1] if self._own_loss is not None and self._own_loss[0] == split else None
        self._own_loss = None
        if community is not None and own is not None and math.isfinite(own):  # a split big enough to score
            self._own_loss = (split, float(own))
        return {"community_loss": float(community) if community is not None else None, "own_loss": last}


    def _round_rank(self, task: RoundTask, base: Any) -> int:
        """The rank this node trains this round (`round_rank`), said in a status line when below r."""
        rank, why = round_rank(task, self.settings.max_rank, base)
        if rank < task.lora.r:
            self.on_status("rank", {"round": task.round, "rank": rank, "project_rank": task.lora.r,
                                    "why": why})
        return rank

    def _take_carry(self, task: RoundTask, start: int = 0) -> Carry | None:
        """The last task's optimizer state if this task goes on from it, else None (a fresh start).

        It goes on when the project keeps optimizers, the mode keeps A frozen (where A trains, the
        aggregate's factors are not the ones the moments were taken on), the settings are the same, and
        the task follows on: in sync, the round right after the one this volunteer trained last (one
        that sat out rounds missed versions); in async, a task on the version the last one trained
        from or a later one (its `round` is a serial number of tasks: other volunteers' tasks come
        between, and a fresh start would spend every short task warming up again). Below the
        project's rank the window of components this task trains from `start` has rolled on since the
        last task's: the moments follow their components (`Carry.shifted`).
        """
        kept, self._carry = self._carry, None
        if kept is None or not task.train.keep_optimizer or modes.get(task.mode).trains("lora_A"):
            return None
        (key, last_round, last_base, last_start), carry = kept
        if key != _carry_key(task) or carry is None:
            return None
        if task.base_version is None and last_base is None:  # sync: the very next round
            goes_on = task.round == last_round + 1
        elif task.base_version is None or last_base is None:  # between a sync task and an async one
            goes_on = False
        else:  # async: the same or a later version
            goes_on = task.base_version >= last_base
        return carry.shifted((start - last_start) % task.lora.r) if goes_on else None

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


def round_rank(task: RoundTask, max_rank: int | None, base: Any) -> tuple[int, str]:
    """The LoRA rank to train this round and why: the project's r, capped by `max_rank`; without a
    cap, on a CUDA device, the largest of r, r/2, ... whose LoRA layers fit in half its free memory
    (`client.model.affordable_rank`). A rank below r only where the mode nests ranks (ffa)."""
    from loracommons.client.model import affordable_rank, free_device_bytes, rank_bytes
    from loracommons.protocol import modes

    r, nested = task.lora.r, modes.get(task.mode).nested_ranks
    if max_rank is not None:
        if max_rank < r and not nested:
            raise VolunteerError(
                f"this project's mode {task.mode!r} trains only its rank {r}; this node's --max-rank is "
                f"{max_rank}: join again without --max-rank (smaller ranks: mode ffa)")
        return min(max_rank, r), f"--max-rank {max_rank}"
    parameter = next(iter(base.parameters()), None)
    free = free_device_bytes(parameter.device) if parameter is not None else None
    if free is None or not nested:
        return r, "the project's rank"
    per_rank = rank_bytes(base, task.lora, task.train.batch_size * task.train.seq_len)
    rank = affordable_rank(free, per_rank, r)
    return rank, f"{free / 2**30:.1f} GiB free on the GPU, ~{per_rank * r / 2**30:.2f} GiB for rank {r}"


def _carry_key(task: RoundTask) -> tuple:
    """Same project, model, LoRA settings, mode and training settings but the learning rate (a project's
    `[round] lr_schedule` changes it from round to round)."""
    return (task.project_id, task.base_model_id, task.base_model_revision, task.lora.digest(), task.mode,
            dataclasses.replace(task.train, learning_rate=0.0))


def load_volunteer(node_config: dict, on_status: OnStatus | None = None) -> Volunteer:
    """Build a `Volunteer` from the SuperNode's node config (set by `loracommons join`)."""
    try:
        max_minutes = float(node_config["max-minutes"]) if node_config.get("max-minutes") else None
        threads = int(node_config["threads"]) if node_config.get("threads") else None
        pace = float(node_config["max-steps-per-second"]) if node_config.get("max-steps-per-second") else None
        if pace is not None and not 0 < pace < float("inf"):
            raise ValueError(f"max-steps-per-second must be a positive number, got {pace}")
        caps = {name: int(node_config[key]) for key, name in (
            ("max-steps", "max_steps"), ("max-batch-size", "max_batch_size"), ("max-seq-len", "max_seq_len"),
            ("max-rank", "max_rank"))
            if node_config.get(key)}
        if any(value < 1 for value in caps.values()):
            raise ValueError(f"caps must be at least 1, got {caps}")
        settings = NodeSettings(
            data_path=str(Path(str(node_config["data-path"])).expanduser()),
            identity_path=str(Path(str(node_config["identity"])).expanduser()),
            device=str(node_config.get("device", "auto")),
            max_minutes=max_minutes,
            threads=threads,
            max_steps_per_second=pace,
            **caps,
        )
    except KeyError as exc:
        raise VolunteerError(f"node config lacks {exc}; start the node with `loracommons join`") from None
    except ValueError as exc:
        raise VolunteerError(f"node config has a bad value ({exc}); start the node with `loracommons join`"
                             ) from None
    return Volunteer(settings, on_status)
