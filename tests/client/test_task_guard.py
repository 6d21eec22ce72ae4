"""A volunteer refuses absurd round tasks and cuts big ones to its own caps (issue 15, item 10).

The bounds are the project config's: one table in protocol/task.py that both the
coordinator's config and the volunteer's task reader check against.
"""

from __future__ import annotations

import json

import pytest

from loracommons.client.volunteer import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_MAX_STEPS,
    NodeSettings,
    VolunteerError,
    load_volunteer,
)
from loracommons.coordinator.config import ConfigError, ProjectConfig, key_info
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.errors import Malformed
from loracommons.protocol.task import LORA_BOUNDS, TRAIN_BOUNDS, LoraSettings, RoundTask, TrainSettings

from . import skill_records, write_jsonl
from .test_volunteer import (  # noqa: F401  (fixtures)
    FAST,
    _one_thread,
    global_adapter,
    make_task,
    make_volunteer,
    model_dir,
    spy,
)


def task_dict(**changes) -> dict:
    task = RoundTask(project_id="proj-1", round=1, nonce="ab" * 16, base_adapter_digest="cd" * 32,
                     base_model_id="loracommons/demo-tiny", base_model_revision="main", mode="ffa",
                     lora=LoraSettings(), train=TrainSettings())
    obj = json.loads(task.to_bytes())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            obj[section][name] = value
        else:
            obj[section] = value
    return obj


ABSURD = {
    "steps-1e18": {"train__max_steps": 10**18},
    "minutes-inf": {"train__max_minutes": 1e308 * 10},
    "minutes-huge": {"train__max_minutes": 1e300},
    "batch-1e9": {"train__batch_size": 10**9},
    "seq-len-1e9": {"train__seq_len": 10**9},
    "lr-string": {"train__learning_rate": "0.1"},
    "lr-zero": {"train__learning_rate": 0},
    "steps-float": {"train__max_steps": 1.5},
    "steps-bool": {"train__max_steps": True},
    "seed-negative": {"train__seed": -1},
    "grad-accum-0": {"train__grad_accum": 0},
    "rank-1e6": {"lora__r": 10**6},
    "alpha-negative": {"lora__alpha": -1.0},
    "modules-empty": {"lora__target_modules": []},
    "payload-negative": {"max_payload_bytes": -1},
    "payload-string": {"max_payload_bytes": "64MiB"},
    "project-markup": {"project_id": "[link=http://x]p[/link]"},
    "digest-short": {"base_adapter_digest": "ab"},
    "nonce-list": {"nonce": ["a"]},
    "model-empty": {"base_model_id": ""},
    "extra-list": {"extra": [1]},
    "round-1e30": {"round": 10**30},
}


@pytest.mark.parametrize("changes", ABSURD.values(), ids=ABSURD.keys())
def test_absurd_task_fields_are_malformed(changes):
    obj = task_dict(**changes)
    try:
        data = canonical_json(obj)
    except ValueError:  # inf cannot even be canonical JSON; send it as the text a peer could
        data = json.dumps(obj).encode().replace(b"Infinity", b"1e400")
    with pytest.raises(Malformed) as info:
        RoundTask.from_bytes(data)
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_a_task_at_the_bounds_is_accepted():
    top = {f"train__{name}": bounds["le"] for name, bounds in TRAIN_BOUNDS.items() if "le" in bounds}
    task = RoundTask.from_bytes(canonical_json(task_dict(**top, lora__r=LORA_BOUNDS["r"]["le"])))
    assert task.train.max_steps == TRAIN_BOUNDS["max_steps"]["le"]


@pytest.mark.parametrize(("key", "value"), [("max_steps", 10**18), ("batch_size", 10**9), ("seq_len", 10**9)])
def test_the_project_config_refuses_what_the_volunteer_refuses(key, value):
    assert {k: {c: v for c, v in meta.items() if c in ("ge", "gt", "le", "lt")}
            for k, meta in key_info(TrainSettings).items()} == TRAIN_BOUNDS
    with pytest.raises(ConfigError, match=f"\\[train\\] {key}"):
        ProjectConfig.from_dict({"train": {key: value}})


def test_caps_take_the_smaller_of_task_and_volunteer():
    caps = NodeSettings("d", "i", max_steps=50, max_batch_size=8, max_seq_len=64, max_minutes=2.0)
    big = TrainSettings(max_steps=10**6, batch_size=4096, seq_len=1 << 20, max_minutes=600.0)
    assert caps.cap(big) == TrainSettings(max_steps=50, batch_size=8, seq_len=64, max_minutes=2.0)
    small = TrainSettings(max_steps=4, batch_size=2, seq_len=32, max_minutes=1.0)
    assert caps.cap(small) == small
    default = NodeSettings("d", "i")
    assert (default.max_steps, default.max_batch_size, default.max_seq_len) == (
        DEFAULT_MAX_STEPS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN)


def test_node_config_carries_the_caps(tmp_path):
    from loracommons.protocol.identity import SigningKey

    data = write_jsonl(tmp_path / "d.jsonl", skill_records(4))
    SigningKey.generate("volunteer").save(tmp_path / "id")
    config = {"data-path": str(data), "identity": str(tmp_path / "id"), "max-steps": "7",
              "max-batch-size": "3", "max-seq-len": "32"}
    settings = load_volunteer(config).settings
    assert (settings.max_steps, settings.max_batch_size, settings.max_seq_len) == (7, 3, 32)
    assert settings.max_steps_per_second is None
    with pytest.raises(VolunteerError, match="bad value"):
        load_volunteer({**config, "max-steps": "0"})
    assert load_volunteer({**config, "max-steps-per-second": "0.5"}).settings.max_steps_per_second == 0.5
    with pytest.raises(VolunteerError, match="bad value"):
        load_volunteer({**config, "max-steps-per-second": "-1"})


def test_a_round_trains_within_the_caps_and_says_so(model_dir, global_adapter, make_volunteer, spy):  # noqa: F811
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer()
    volunteer.settings = NodeSettings(**{**volunteer.settings.__dict__, "max_steps": 2, "max_batch_size": 2})
    said: list[tuple[str, dict]] = []
    volunteer.on_status = lambda state, details: said.append((state, details))
    task = make_task(model_dir, adapter_bytes, train=TrainSettings(**{**FAST.__dict__, "max_steps": 10_000}))
    envelope = volunteer.run_round(task, adapter_bytes)
    assert spy[0]["settings"].max_steps == 2 and spy[0]["settings"].batch_size == 2
    assert json.loads(envelope.manifest)["steps"] == 2
    assert ("capped", {"round": 3, "fields": {"max_steps": [10_000, 2], "batch_size": [FAST.batch_size, 2]}}
            ) in said
