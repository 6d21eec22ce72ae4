"""A volunteer's local data: load, validate, tokenize, split.

Files: JSONL (``.jsonl``, ``.ndjson``, ``.json``), CSV, Parquet, plain text, or a
folder written by ``datasets.Dataset.save_to_disk``. Each record is in one of
three formats, the same for the whole file:

    text         {"text": ...}                                   loss on every token
    instruction  {"instruction": ..., "input": ..., "output": ...} loss on output + eos
    chat         {"messages": [{"role": ..., "content": ...}]}   loss on assistant turns

A record with ``messages`` is chat, else one with ``instruction`` or ``output``
is instruction, else one with ``text`` is text; other columns are ignored. In
CSV, ``messages`` is a JSON string. Plain text: examples are separated by blank
lines; a file without any blank line holds one example per line.

`load_records` validates everything and raises `DataError` naming file, line
(row, for Parquet and ``datasets`` folders) and field, before any model is
loaded. This module imports torch only in `TokenizedData.batch`, so data can be
checked without the training stack.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding)."""
RECORD_FORMATS = ("text", "instruction", "chat")
FILE_FORMATS = ("jsonl", "csv", "parquet", "txt", "datasets")
CHAT_ROLES = ("system", "user", "assistant", "tool")
_SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt", ".md": "txt",
}


class DataError(ValueError):
    """A data file that cannot be trained on; the message names file, line and field."""


def render_instruction_prompt(instruction: str, input: str | None = "") -> str:
    """The project-wide prompt; the training text is prompt + output + eos."""
    prompt = f"### Instruction:\n{instruction}\n"
    if input:
        prompt += f"### Input:\n{input}\n"
    return prompt + "### Response:\n"


# ---------------------------------------------------------------- loading


def load_records(path: str | Path, fmt: str = "auto") -> list[dict]:
    """Read and validate every record of a data file or ``datasets`` folder.

    `fmt` is the file format (one of `FILE_FORMATS`), or ``auto`` to tell it by
    suffix. Records come back normalized: ``{"text"}``, ``{"instruction",
    "input", "output"}`` or ``{"messages"}``; `records_format` says which.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    fmt = _file_format(path) if fmt == "auto" else fmt
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
               "txt": _read_txt, "datasets": _read_datasets}
    if fmt not in readers:
        raise DataError(f"{path}: unknown data format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
    records: list[dict] = []
    first: tuple[str, str] | None = None  # (format, where) of the first record
    for where, raw in readers[fmt](path):
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


def _file_format(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the data format from suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(_SUFFIXES))} or a datasets folder"
        )
    return fmt


def _decode_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line, refusing invalid UTF-8 by line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} line {number}: not valid UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _read_json_array(path)
        return
    for number, line in _decode_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield where, obj


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records or one JSON object per line")
    for index, obj in enumerate(items, start=1):
        yield f"{path} item {index}", obj


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    lines = (line + "\n" for _, line in _decode_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or not all(h.strip() for h in header):
            raise DataError(f"{path} line 1: header has empty or repeated column names")
        start = reader.line_num + 1
        for row in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: row has {len(row)} fields, the header has {len(header)}")
            record: dict[str, Any] = dict(zip(header, row, strict=True))
            if "messages" in record:  # a CSV cell holds the list as JSON
                try:
                    record["messages"] = json.loads(record["messages"])
                except json.JSONDecodeError:
                    raise DataError(f"{where}: field 'messages' is not valid JSON") from None
            yield where, record
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {index}", row


def _read_datasets(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a `datasets` folder: install the extra with "
                        "`pip install 'loracommons[datasets]'`") from None

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, or datasets' own errors for foreign folders
        raise DataError(f"{path}: not a folder saved by datasets ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" in data:
            data = data["train"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise DataError(f"{path}: dataset has splits {sorted(data)} and none is named 'train'")
    for index, row in enumerate(data, start=1):
        yield f"{path} row {index}", row


def _read_txt(path: Path) -> Iterator[tuple[str, Any]]:
    lines = list(_decode_lines(path))
    if not any(not text.strip() for _, text in lines[:-1]):  # no blank line: one example per line
        for number, text in lines:
            if text.strip():
                yield f"{path} line {number}", {"text": text}
        return
    block: list[str] = []
    start = 0
    for number, text in [*lines, (len(lines) + 1, "")]:
        if text.strip():
            start = start or number
            block.append(text)
        elif block:
            yield f"{path} line {start}", {"text": "\n".join(block)}
            block, start = [], 0


# ---------------------------------------------------------------- validation


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

