"""Read a volunteer's data file, in any of `FILE_FORMATS`, into raw rows, each with where it came from.

JSONL (``.jsonl``, ``.ndjson``, ``.json``; a JSON array too), CSV (a ``messages`` cell holds
JSON), Parquet, plain text (examples separated by blank lines, or one per line when the file has
none), or a folder written by ``datasets.Dataset.save_to_disk``. Rows are not validated here:
`loracommons.client.data` does that. `DataError` is defined here, at the bottom of the data
modules, because a file that cannot be read is data that cannot be trained on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_FORMATS = ("jsonl", "csv", "parquet", "txt", "datasets")
_SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt", ".md": "txt",
}


class DataError(ValueError):
    """A data file that cannot be trained on; the message names file, line and field."""


def read_rows(path: Path, fmt: str = "auto") -> Iterator[tuple[str, Any]]:
    """(where, raw row) of each example in `path`; `fmt` is one of `FILE_FORMATS` or ``auto`` (by suffix)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    fmt = _file_format(path) if fmt == "auto" else fmt
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
               "txt": _read_txt, "datasets": _read_datasets}
    if fmt not in readers:
        raise DataError(f"{path}: unknown data format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
    return readers[fmt](path)


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
