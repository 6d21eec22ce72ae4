"""The local training loop of one round: plain PyTorch, bounded by steps and minutes.

AdamW over the trainable LoRA factors, linear warmup then cosine decay to a
tenth of the peak rate, gradient accumulation, gradient clipping at 1.0. One
optimizer step = `grad_accum` micro-batches of `batch_size` examples, drawn
without replacement from a seeded shuffle (a new shuffle each epoch). The
loss is the mean over every labelled token of the step. Training stops at
`max_steps` or before a step that would end past `max_minutes` (judged after
every step by the mean step time so far; at least one step always runs), so a
slow machine sends a smaller update in the time a fast one sends a full one.
On CPU, the same inputs, seed and thread count give a bit-identical update.

Across rounds (`carry`): a volunteer whose next round starts from the global
adapter its last update went into passes back the `Carry` of that round: the
AdamW moments go on and the learning-rate schedule counts the volunteer's steps
since the carry began, so the warmup happens once and not at every round (a
round of 10 steps with a 5-step warmup spent half of every round warming up).
Within each round the rate still decays from the peak to a tenth (cosine).

    result = train(model, tokenizer, data, TrainSettings(max_steps=30), "ffa", on_step=print)
    again = train(model, tokenizer, data, settings, "ffa", carry=result.carry)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loracommons.client.data import IGNORE_INDEX, TokenizedData
from loracommons.client.evaluate import lm_loss, tokenized_loss
from loracommons.client.model import extract_update
from loracommons.protocol import schedule
from loracommons.protocol.task import TrainSettings

log = logging.getLogger(__name__)

OnStep = Callable[[int, int, float, float], None]
"""on_step(step, max_steps, loss, tokens_per_s), called after every optimizer step."""
MAX_GRAD_NORM = 1.0
LOSS_WINDOW = 10
"""`train_loss` is the mean loss of this many last steps."""


@dataclass(frozen=True)
class Carry:
    """What one round's optimizer leaves for the next: AdamW's state and the steps taken so far."""

    optimizer: dict[str, Any] = field(repr=False)
    """`torch.optim.AdamW.state_dict()` at the end of the round (moments per trainable tensor)."""
    steps: int
    """Optimizer steps since the carry began: the clock of the warmup."""
    shapes: tuple[tuple[int, ...], ...]
    """Shapes of the trainable tensors, in order: a carry that does not fit them is not used."""

    def shifted(self, shift: int) -> Carry:
        """The carry for a window of components moved on by `shift` (nested ranks: a rank-r_i window
        rolls on each round, `protocol.lora.window_start`). Each trainable tensor's last axis is its
        components: the moments of the ones still in the window move to their new places; a component
        entering it starts with a zero first moment and, as its second, the mean of the kept ones' per
        row (a zero second moment, with the shared step count past Adam's bias correction, would make
        its first steps several times too large). `shift` 0: this carry itself."""
        if shift == 0:
            return self
        state: dict[Any, dict[str, Any]] = {}
        for key, moments in self.optimizer["state"].items():
            state[key] = dict(moments)
            first, second = moments.get("exp_avg"), moments.get("exp_avg_sq")
            if first is None or second is None or first.dim() == 0:
                continue
            keep = max(first.shape[-1] - shift, 0)
            prior = (second[..., shift:] if keep else second).mean(dim=-1, keepdim=True)
            fresh = first.shape[-1] - keep
            state[key]["exp_avg"] = torch.cat(
                [first[..., shift:], first.new_zeros((*first.shape[:-1], fresh))], dim=-1)
            state[key]["exp_avg_sq"] = torch.cat(
                [second[..., shift:], prior.expand(*second.shape[:-1], fresh)], dim=-1).contiguous()
        return Carry({**self.optimizer, "state": state}, self.steps, self.shapes)


@dataclass(frozen=True)
class TrainResult:
    update: dict[str, np.ndarray]
    """Tensors the update carries (names per the mode's `Mode.sent_names`), payload dtype."""
    examples: int
    """Training examples (records) available to this round."""
    steps: int
    """Optimizer steps taken."""
    train_loss: float
    """Mean loss per labelled token over the last `LOSS_WINDOW` steps."""
    eval_loss: float | None
    """Loss on the held-out data after training, or None without held-out data."""
    tokens: int
    """Non-padding tokens processed."""
    seconds: float
    """Wall time of the training steps (evaluation excluded)."""
    tokens_per_s: float
    stopped_by: str
    """``max_steps`` or ``max_minutes``."""
    losses: list[float] = field(default_factory=list, repr=False)
    """Loss of every step."""
    carry: Carry | None = field(default=None, repr=False)
    """The optimizer's state after this round, for `train(..., carry=)` next round."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at 0-based `step`: a linear warmup, then `schedule.cosine`."""
    warmup = min(warmup, total - 1) if total > 1 else 0
    if step < warmup:
        return (step + 1) / warmup
    return schedule.cosine((step - warmup) / max(1, total - warmup - 1))


def carried_lr_factor(step: int, done: int, warmup: int, total: int) -> float:
    """Multiplier of the peak rate at 0-based `step` of a round when `done` steps were taken
    before it under the same carry: warmup over the first `warmup` steps of the carry only,
    then each round a cosine from the peak to a tenth (the round's own `lr_factor` without warmup)."""
    if done + step < warmup:
        return (done + step + 1) / warmup
    return lr_factor(step, 0, total)


def _fits(carry: Carry | None, params: list[torch.Tensor]) -> bool:
    return carry is not None and carry.shapes == tuple(tuple(p.shape) for p in params)


def _index_stream(n: int, generator: torch.Generator) -> Iterator[int]:
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to `count` inside the block (None or 0: left as they are)."""
    if not count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: Any,
    tokenizer: Any,
    data: TokenizedData,
    settings: TrainSettings,
    mode: str,
    heldout: TokenizedData | None = None,
    on_step: OnStep | None = None,
    payload_dtype: str = "float32",
    threads: int | None = None,
    max_steps_per_second: float | None = None,
    carry: Carry | None = None,
    paced_since: float | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on `data` and return the update.

    `model` is what `apply_adapter` returned (its requires_grad flags pick what
    trains); `tokenizer` is unused beyond API symmetry (padding comes with
    `data`). `threads` sets torch's CPU threads for this call only. `max_steps_per_second` is
    the volunteer's pace cap: after each step it sleeps until step / cap seconds have passed since
    `paced_since` (a `time.monotonic()` reading: the volunteer passes the moment its task arrived, so the
    cap paces the whole task, evaluation included; None: since training started). `carry`: the
    previous round's `TrainResult.carry`, to go on with its optimizer state (a
    carry whose tensor shapes differ from the model's is ignored: a fresh start).
    """
    del tokenizer
    if len(data) == 0:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call apply_adapter first")
    device = params[0].device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch_threads(threads), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(settings.seed)  # LoRA dropout draws from the global generator
        if carry is not None and not _fits(carry, params):
            log.info("optimizer state of the last round does not fit the model; starting afresh")
            carry = None
        steps, losses, tokens, seconds, stopped_by, after = _loop(
            model, params, data, settings, on_step, device, carry, max_steps_per_second, paced_since)
        eval_loss = tokenized_loss(model, heldout, settings.batch_size) if heldout is not None else None
    window = losses[-LOSS_WINDOW:]
    return TrainResult(
        update=extract_update(model, mode, payload_dtype),
        examples=data.examples,
        steps=steps,
        train_loss=float(sum(window) / len(window)),
        eval_loss=eval_loss,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        stopped_by=stopped_by,
        losses=losses,
        carry=after,
    )


def _loop(
    model: Any,
    params: list[torch.Tensor],
    data: TokenizedData,
    settings: TrainSettings,
    on_step: OnStep | None,
    device: torch.device,
    carry: Carry | None,
    max_steps_per_second: float | None = None,
    paced_since: float | None = None,
) -> tuple[int, list[float], int, float, str, Carry]:
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    done = 0
    if carry is not None:
        optimizer.load_state_dict(carry.optimizer)
        for group in optimizer.param_groups:  # the task's rate, not the one saved with the state
            group["lr"] = group["initial_lr"] = settings.learning_rate
            group["weight_decay"] = settings.weight_decay
        done = carry.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: carried_lr_factor(s, done, settings.warmup_steps, settings.max_steps) if carry is not None
        else lr_factor(s, settings.warmup_steps, settings.max_steps),
    )
    fp16 = device.type == "cuda" and any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    generator = torch.Generator().manual_seed(settings.seed)
    indices = _index_stream(len(data), generator)
    accum = max(1, settings.grad_accum)
    losses: list[float] = []
    tokens, step, stopped_by = 0, 0, "max_steps"
    start = time.monotonic()
    paced_from = start if paced_since is None else min(paced_since, start)
    deadline = start + settings.max_minutes * 60.0
    model.train()
    try:
        while step < settings.max_steps:
            batches = [data.batch([next(indices) for _ in range(settings.batch_size)], device)
                       for _ in range(accum)]
            targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                loss_sum, _ = lm_loss(model, batch)
                loss = loss_sum / max(targets, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            losses.append(step_loss)
            if max_steps_per_second:  # the volunteer's pace cap: no faster than this on average
                time.sleep(max(0.0, paced_from + step / max_steps_per_second - time.monotonic()))
            elapsed = time.monotonic() - start
            if on_step is not None:
                on_step(step, settings.max_steps, step_loss, tokens / elapsed if elapsed > 0 else 0.0)
            now = time.monotonic()
            if step < settings.max_steps and now + (now - start) / step > deadline:  # next step ends late
                stopped_by = "max_minutes"
                log.info("stopping at step %d of %d: the next would end past %.2f minutes", step,
                         settings.max_steps, settings.max_minutes)
                break
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    after = Carry(optimizer.state_dict(), done + step, tuple(tuple(p.shape) for p in params))
    return step, losses, tokens, time.monotonic() - start, stopped_by, after


@contextmanager
def rich_progress(
    description: str = "training", console: Any = None, transient: bool = False
) -> Iterator[OnStep]:
    """A Rich progress bar; yields an `on_step` callback that drives it.

        with rich_progress("round 3") as on_step:
            result = train(..., on_step=on_step)
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )
    task = progress.add_task(description, total=None, loss="-", rate="-")

    def on_step(step: int, max_steps: int, loss: float, tokens_per_s: float) -> None:
        progress.update(
            task, completed=step, total=max_steps, loss=f"{loss:.4f}", rate=f"{tokens_per_s:,.0f}"
        )

    with progress:
        yield on_step
