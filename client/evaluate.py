"""Local evaluation: held-out loss and exact-match accuracy of greedy answers.

The loss is the same token-level cross entropy the trainer minimizes (labelled
tokens only); exact match decodes the response to each instruction prompt
greedily, in left-padded batches, and compares it stripped to the expected output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from loracommons.client.data import (
    IGNORE_INDEX,
    DataError,
    TokenizedData,
    encode_prompt,
    records_format,
    render_instruction_prompt,
    tokenize,
)

log = logging.getLogger(__name__)


def lm_loss(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled tokens, and how many there are.

    Batches are right-padded, so under causal attention no real token ever sees a
    pad: the attention mask can be left out, which keeps SDPA on its causal fast path.
    """
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # no KV cache: one pass
    targets = batch["labels"][:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((targets != IGNORE_INDEX).sum())


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off and no autograd inside; the previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def tokenized_loss(model: Any, data: TokenizedData, batch_size: int = 32) -> float:
    """Mean loss per labelled token of `data`."""
    return scored_loss(model, data, batch_size)[0]


def scored_loss(model: Any, data: TokenizedData, batch_size: int = 32) -> tuple[float, int]:
    """Mean loss per labelled token of `data`, and how many labelled tokens it was measured on
    (what a volunteer signs as its evaluation of the global adapter)."""
    total, count = 0.0, 0
    device = _device(model)
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))), device)
            loss, n = lm_loss(model, batch)
            total += float(loss)
            count += n
    return total / max(count, 1), count


def heldout_loss(
    model: Any, tokenizer: Any, records: list[dict], seq_len: int, batch_size: int = 32
) -> float:
    """Mean loss per labelled token of held-out records (responses only, where the format has them)."""
    return tokenized_loss(model, tokenize(records, tokenizer, seq_len), batch_size)


def generate_responses(
    model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy answer to each instruction record's prompt, in the records' order."""
    if records_format(records) != "instruction":
        raise DataError("exact match needs instruction-format records (instruction/input/output)")
    prompts = [
        encode_prompt(tokenizer, render_instruction_prompt(r["instruction"], r.get("input"))) for r in records
    ]
    eos = tokenizer.eos_token_id
    pad = next(t for t in (tokenizer.pad_token_id, eos, 0) if t is not None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    device = _device(model)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[j, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[j, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=eos,
            )
            for j, i in enumerate(rows):
                new = out[j, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                answers[i] = tokenizer.decode(new, skip_special_tokens=True)
    return answers


def exact_match(
    model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int = 32, batch_size: int = 64
) -> float:
    """Fraction of instruction records whose greedy answer, stripped, equals the output, stripped."""
    answers = generate_responses(model, tokenizer, records, max_new_tokens, batch_size)
    hits = sum(a.strip() == r["output"].strip() for a, r in zip(answers, records, strict=True))
    return hits / len(records)
