"""Loading, validating, tokenizing and splitting a volunteer's data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from loracommons.client.data import (
    IGNORE_INDEX,
    DataError,
    load_records,
    records_format,
    render_instruction_prompt,
    split_heldout,
    tokenize,
)

from . import build_tokenizer, write_jsonl

INSTRUCTION = [
    {"instruction": "Reverse.", "input": "abc", "output": "cba"},
    {"instruction": "Say hi.", "output": "hi"},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "ok!"}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_prompt_template_is_the_project_one():
    assert render_instruction_prompt("Do.", "x") == "### Instruction:\nDo.\n### Input:\nx\n### Response:\n"
    assert render_instruction_prompt("Do.", "") == "### Instruction:\nDo.\n### Response:\n"
    assert render_instruction_prompt("Do.", None) == "### Instruction:\nDo.\n### Response:\n"


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        ([{"text": "hello"}, {"text": "world", "meta": 1}], "text"),
        (INSTRUCTION, "instruction"),
        (CHAT, "chat"),
    ],
)
def test_jsonl_formats(tmp_path, rows, kind):
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert records_format(records) == kind
    assert len(records) == len(rows)
    if kind == "instruction":
        assert records[1] == {"instruction": "Say hi.", "input": "", "output": "hi"}


def test_json_array(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(INSTRUCTION))
    assert [r["output"] for r in load_records(tmp_path / "d.json")] == ["cba", "hi"]


def test_csv_instruction_and_chat(tmp_path):
    (tmp_path / "i.csv").write_text('instruction,input,output\nReverse.,abc,cba\n"Say, hi.",,"h\ni"\n')
    records = load_records(tmp_path / "i.csv")
    assert records[1] == {"instruction": "Say, hi.", "input": "", "output": "h\ni"}
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["messages", "id"], [json.dumps(CHAT[0]["messages"]), "7"]])
    assert load_records(tmp_path / "c.csv") == CHAT


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(INSTRUCTION), tmp_path / "d.parquet")
    assert [r["output"] for r in load_records(tmp_path / "d.parquet")] == ["cba", "hi"]
    pq.write_table(pa.Table.from_pylist(CHAT), tmp_path / "c.parquet")
    assert load_records(tmp_path / "c.parquet") == CHAT


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("one\ntwo\n\nthree\n", ["one\ntwo", "three"]),  # blank lines separate examples
        ("\n\nfirst para\nsecond line\n\n\n\nlast\n", ["first para\nsecond line", "last"]),
        ("one\ntwo\nthree", ["one", "two", "three"]),  # no blank line: one example per line
    ],
)
def test_txt(tmp_path, content, expected):
    (tmp_path / "d.txt").write_text(content)
    assert [r["text"] for r in load_records(tmp_path / "d.txt")] == expected


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(INSTRUCTION).save_to_disk(str(tmp_path / "ds"))
    assert [r["output"] for r in load_records(tmp_path / "ds")] == ["cba", "hi"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT),
                                   "test": datasets.Dataset.from_list(CHAT)})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd") == CHAT


GOOD = json.dumps(INSTRUCTION[0])


@pytest.mark.parametrize(
    ("name", "content", "where", "what"),
    [
        ("d.jsonl", f"{GOOD}\n{GOOD}\n{{oops\n", "line 3", "not valid JSON"),
        ("d.jsonl", f'{GOOD}\n{{"instruction": "x", "input": ""}}\n', "line 2", "field 'output' missing"),
        ("d.jsonl", f'{GOOD}\n\n{{"output": "x"}}\n', "line 3", "field 'instruction' missing"),
        ("d.jsonl", '{"instruction": "x", "output": 3}\n', "line 1", "field 'output' must be a string"),
        ("d.jsonl", '{"messages": "hi"}\n', "line 1", "'messages' must be a non-empty list"),
        ("d.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1", "item 1: field 'content' missing"),
        ("d.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "line 1", "role 'robot'"),
        ("d.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', "line 1", "no assistant turn"),
        ("d.jsonl", f'{GOOD}\n{{"text": "plain"}}\n', "line 2", "mixed formats"),
        ("d.jsonl", f"{GOOD}\n[1, 2]\n", "line 2", "expected an object"),
        ("d.jsonl", '{"prompt": "x", "completion": "y"}\n', "line 1", "no 'text'"),
        ("d.jsonl", '{"text": "  "}\n', "line 1", "field 'text' is empty"),
        ("d.csv", "instruction,input,output\na,b,c\na,b\n", "line 3", "row has 2 fields"),
        ("d.csv", "instruction,input\na,b\n", "line 2", "field 'output' missing"),
        ("d.csv", "messages\n[not json\n", "line 2", "'messages' is not valid JSON"),
        ("d.txt", b"good\n\xff\xfe bad\n", "line 2", "not valid UTF-8"),
    ],
)
def test_bad_files_name_file_line_and_field(tmp_path, name, content, where, what):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        load_records(path)
    message = str(err.value)
    assert str(path) in message and f"{where}:" in message and what in message, message


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("d.jsonl", "", "empty"),
        ("d.jsonl", "\n\n", "empty"),
        ("d.csv", "instruction,input,output\n", "empty"),
        ("d.txt", "", "empty"),
        ("d.xlsx", "x", "cannot tell the data format"),
        ("d.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_empty_and_unreadable_files(tmp_path, name, content, what):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=what):
        load_records(tmp_path / name)


def test_missing_path_and_non_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a folder saved by datasets"):
        load_records(tmp_path)


def test_validation_needs_no_torch(tmp_path):
    """A bad file is refused before the training stack (or any model) is imported."""
    write_jsonl(tmp_path / "d.jsonl", [INSTRUCTION[0], {"instruction": "x"}])
    code = (
        "import sys\nfrom loracommons.client.data import DataError, load_records\n"
        f"try:\n    load_records({str(tmp_path / 'd.jsonl')!r})\n"
        "except DataError as e:\n    print(e)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "line 2: field 'output' missing" in out
    assert out.strip().endswith("False False")


def _labelled(tokenizer, ids, labels):
    return tokenizer.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])


def test_instruction_labels_mask_the_prompt(tokenizer):
    data = tokenize(load_like(INSTRUCTION), tokenizer, seq_len=128)
    prompt = tokenizer(render_instruction_prompt("Reverse.", "abc"))["input_ids"]
    ids, labels = data.input_ids[0], data.labels[0]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert _labelled(tokenizer, ids, labels) == "cba</s>"
    assert data.format == "instruction" and data.examples == 2


def test_chat_labels_only_assistant_turns(tokenizer):
    data = tokenize(CHAT, tokenizer, seq_len=256)
    ids, labels = data.input_ids[0], data.labels[0]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert _labelled(tokenizer, ids, labels) == "yo</s>\nok!</s>\n"


def test_text_labels_everything_and_truncates(tokenizer):
    data = tokenize([{"text": "abcdefgh"}, {"text": "xy"}], tokenizer, seq_len=5)
    assert data.labels == data.input_ids
    assert [len(r) for r in data.input_ids] == [5, 4]  # bos + 2 chars + eos
    assert data.truncated == 1


def test_packing_text(tokenizer):
    records = [{"text": "abcdefgh"}, {"text": "xy"}, {"text": "hello world"}]
    plain = tokenize(records, tokenizer, seq_len=64)
    packed = tokenize(records, tokenizer, seq_len=8, pack=True)
    assert all(len(r) <= 8 for r in packed.input_ids)
    assert [t for r in packed.input_ids for t in r] == [t for r in plain.input_ids for t in r]
    assert packed.examples == 3
    with pytest.raises(DataError, match="packing applies to text"):
        tokenize(load_like(INSTRUCTION), tokenizer, seq_len=8, pack=True)


def test_prompt_longer_than_seq_len_is_dropped(tokenizer):
    records = load_like([{"instruction": "x" * 80, "input": "", "output": "y"}, INSTRUCTION[0]])
    data = tokenize(records, tokenizer, seq_len=64)
    assert len(data) == 1 and data.dropped == 1 and data.truncated == 1
    with pytest.raises(DataError, match="seq_len=10"):
        tokenize(records, tokenizer, seq_len=10)


def test_batch_pads_and_masks(tokenizer):
    data = tokenize([{"text": "abcdef"}, {"text": "x"}], tokenizer, seq_len=64)
    batch = data.batch([1, 0])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [3, 8]
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()


def test_split_heldout_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(50)]
    train, held = split_heldout(records, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert split_heldout(records, 0.2, seed=3) == (train, held)
    assert split_heldout(records, 0.2, seed=4)[1] != held
    assert split_heldout(records[:2], 0.01, seed=0)[1] and split_heldout(records[:1], 0.5, seed=0)[0]
    assert split_heldout(records, 0.0, seed=0) == (records, [])


def load_like(rows: list[dict]) -> list[dict]:
    """Normalize rows as load_records would."""
    return [{"input": "", **r} for r in rows]
