"""A volunteer's local data: load and validate records, tokenize them, split off a held-out part.

Reading the file itself (JSONL, CSV, Parquet, plain text, or a folder written by
``datasets.Dataset.save_to_disk``) is `loracommons.client._data_files`. Each record is in one
of three formats, the same for the whole file:

    text         {"text": ...}                                   loss on every token
    instruction  {"instruction": ..., "input": ..., "output": ...} loss on output + eos
    chat         {"messages": [{"role": ..., "content": ...}]}   loss on assistant turns

A record with ``messages`` is chat, else one with ``instruction`` or ``output``
is instruction, else one with ``text`` is text; other columns are ignored.

`load_records` validates everything and raises `DataError` naming file, line
(row, for Parquet and ``datasets`` folders) and field, before any model is
loaded. This module imports torch only in `TokenizedData.batch`, so data can be
checked without the training stack.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracommons.client._data_files import FILE_FORMATS, DataError, read_rows

__all__ = [  # DataError and FILE_FORMATS are defined with the file readers, and public here
    "CHAT_ROLES", "FILE_FORMATS", "IGNORE_INDEX", "RECORD_FORMATS", "DataError", "TokenizedData",
    "encode_prompt", "load_records", "records_format", "render_instruction_prompt", "split_heldout",
    "tokenize",
]

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding)."""
RECORD_FORMATS = ("text", "instruction", "chat")
CHAT_ROLES = ("system", "user", "assistant", "tool")


def render_instruction_prompt(instruction: str, input: str | None = "") -> str:
    """The project-wide prompt; the training text is prompt + output + eos."""
    prompt = f"### Instruction:\n{instruction}\n"
    if input:
        prompt += f"### Input:\n{input}\n"
    return prompt + "### Response:\n"


# ---------------------------------------------------------------- loading and validating


def load_records(path: str | Path, fmt: str = "auto") -> list[dict]:
    """Read and validate every record of a data file or ``datasets`` folder.

    `fmt` is the file format (one of `FILE_FORMATS`), or ``auto`` to tell it by
    suffix. Records come back normalized: ``{"text"}``, ``{"instruction",
    "input", "output"}`` or ``{"messages"}``; `records_format` says which.
    """
    path = Path(path)
    records: list[dict] = []
    first: tuple[str, str] | None = None  # (format, where) of the first record
    for where, raw in read_rows(path, fmt):
        kind, record = _normalize(raw, where)
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise DataError(
                f"{where}: record is in {kind} format but the first record ({first[1]}) is in "
                f"{first[0]} format; mixed formats in one file are not supported"
            )
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def records_format(records: list[dict]) -> str:
    """Format of normalized records (``text``, ``instruction`` or ``chat``)."""
    if not records:
        raise DataError("no records")
    head = records[0]
    return "chat" if "messages" in head else "instruction" if "output" in head else "text"


def _normalize(raw: Any, where: str) -> tuple[str, dict]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(raw).__name__}")
    if "messages" in raw:
        return "chat", {"messages": _messages(raw["messages"], where)}
    if "instruction" in raw or "output" in raw:
        for name in ("instruction", "output"):
            if name not in raw:
                raise DataError(f"{where}: field {name!r} missing")
        record = {
            "instruction": _string(raw, "instruction", where, nonempty=True),
            "input": _string(raw, "input", where, optional=True),
            "output": _string(raw, "output", where),
        }
        return "instruction", record
    if "text" in raw:
        return "text", {"text": _string(raw, "text", where, nonempty=True)}
    fields = ", ".join(repr(k) for k in list(raw)[:6]) or "none"
    raise DataError(
        f"{where}: no 'text', 'instruction'/'output' or 'messages' field (fields: {fields})"
    )


def _string(obj: dict, name: str, where: str, *, optional: bool = False, nonempty: bool = False) -> str:
    value = obj.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for index, message in enumerate(value, start=1):
        at = f"{where}: 'messages' item {index}"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        for name in ("role", "content"):
            if name not in message or message[name] is None:
                raise DataError(f"{at}: field {name!r} missing")
            if not isinstance(message[name], str):
                raise DataError(f"{at}: field {name!r} must be a string")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{at}: role {message['role']!r} not one of {', '.join(CHAT_ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
    return out


# ---------------------------------------------------------------- tokenizing


@dataclass
class TokenizedData:
    """Token ids and labels (``IGNORE_INDEX`` where no loss), one row per example."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    format: str
    pad_id: int
    examples: int
    """Records these rows came from (packing changes rows, not examples)."""
    truncated: int = 0
    """Examples cut at `seq_len`."""
    dropped: int = 0
    """Examples left without a single labelled token after truncation."""
    _padded: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.input_ids)

    def batch(self, indices: Iterable[int], device: Any = "cpu") -> dict:
        """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` of these rows."""
        import torch

        if self._padded is None:  # pad once; a batch is then a gather and a trim
            width = max(len(row) for row in self.input_ids)
            ids = torch.full((len(self), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(self), width), IGNORE_INDEX, dtype=torch.long)
            lengths = torch.tensor([len(row) for row in self.input_ids], dtype=torch.long)
            for i, (x, y) in enumerate(zip(self.input_ids, self.labels, strict=True)):
                ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
            self._padded = (ids, labels, lengths)
        ids, labels, lengths = self._padded
        index = torch.as_tensor(list(indices), dtype=torch.long)
        rows = lengths[index]
        width = int(rows.max())
        mask = (torch.arange(width)[None, :] < rows[:, None]).long()
        return {
            "input_ids": ids[index, :width].to(device),
            "attention_mask": mask.to(device),
            "labels": labels[index, :width].to(device),
        }


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of a prompt as training and generation both see it (with the tokenizer's bos)."""
    return list(tokenizer(prompt)["input_ids"])


def _encode_response(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize(records: list[dict], tokenizer: Any, seq_len: int, pack: bool = False) -> TokenizedData:
    """Token ids and labels of normalized records, truncated (or, for text, packed) to `seq_len`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    kind = records_format(records)
    if pack and kind != "text":
        raise DataError(f"packing applies to text-format data only; this data is {kind} format")
    if kind == "text":
        pairs = [_text_pair(tokenizer, r["text"]) for r in records]
    elif kind == "instruction":
        pairs = [_instruction_pair(tokenizer, r) for r in records]
    else:
        pairs = [_chat_pair(tokenizer, r["messages"]) for r in records]
    pad = _pad_id(tokenizer)
    if pack:
        stream = [t for ids, _ in pairs for t in ids]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        rows = [r for r in rows if len(r) >= 2]
        return TokenizedData(rows, [list(r) for r in rows], kind, pad, examples=len(records))
    input_ids, labels, truncated, dropped = [], [], 0, 0
    for ids, labs in pairs:
        if len(ids) > seq_len:
            truncated += 1
            ids, labs = ids[:seq_len], labs[:seq_len]
        if all(label == IGNORE_INDEX for label in labs[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        input_ids.append(ids)
        labels.append(labs)
    if not input_ids:
        raise DataError(
            f"no example keeps a response token within seq_len={seq_len}; prompts are too long"
        )
    return TokenizedData(input_ids, labels, kind, pad, len(input_ids), truncated, dropped)


def _text_pair(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    ids = encode_prompt(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids, list(ids)


def _instruction_pair(tokenizer: Any, record: dict) -> tuple[list[int], list[int]]:
    prompt = encode_prompt(tokenizer, render_instruction_prompt(record["instruction"], record.get("input")))
    answer = _encode_response(tokenizer, record["output"])
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _chat_pair(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render turn by turn so each assistant reply is a separately labelled span."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat-format data needs a tokenizer with a chat template; this one has none")

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    segments: list[tuple[str, bool]] = []  # (text, trained)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            opened = render(i, generation_prompt=True)
            segments.append((_suffix(opened, done), False))
            done = render(i + 1)
            segments.append((_suffix(done, opened), True))
        else:
            rendered = render(i + 1)
            segments.append((_suffix(rendered, done), False))
            done = rendered
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        if text:
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise DataError(
            "the tokenizer's chat template does not render conversations incrementally "
            "(a shorter conversation is not a prefix of a longer one); cannot mask non-assistant turns"
        )
    return text[len(prefix) :]


# ---------------------------------------------------------------- splitting


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, heldout) split; heldout gets round(fraction * n), at least one
    record when `fraction` > 0, and train always keeps one. Order within each part is kept."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    n = len(records)
    size = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(f"heldout:{seed}").shuffle(order)
    held = set(order[:size])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]

