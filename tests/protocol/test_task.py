"""Round tasks and LoRA settings: JSON round-trip, strict parsing, and the claims they imply."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracommons.protocol import modes
from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import DTYPES, TensorSpec, encode_tensors
from loracommons.protocol.envelope import Expected, UpdateManifest, sign_update, verify_update
from loracommons.protocol.errors import Malformed, MissingField, UnknownField
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import LoraSettings, RoundTask, TrainSettings

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

lora_settings = st.builds(
    LoraSettings,
    r=st.integers(1, 256),
    alpha=st.floats(0.5, 512, allow_nan=False),
    dropout=st.floats(0, 0.5),
    target_modules=st.lists(st.sampled_from(MODULES), min_size=1, unique=True).map(tuple),
)
train_settings = st.builds(
    TrainSettings,
    max_steps=st.integers(1, 10_000),
    max_minutes=st.floats(0.1, 600),
    batch_size=st.integers(1, 512),
    learning_rate=st.floats(1e-6, 1.0),
    seed=st.integers(0, 2**32),
)
round_tasks = st.builds(
    RoundTask,
    project_id=st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,29}\Z"),
    round=st.integers(0, 10**6),
    nonce=st.binary(min_size=16, max_size=16).map(bytes.hex),
    base_adapter_digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
    base_model_id=st.sampled_from(["loracommons/demo-tiny", "/models/llama", "meta-llama/Llama-3.2-1B"]),
    base_model_revision=st.text(max_size=20),
    mode=st.sampled_from(modes.names()),
    lora=lora_settings,
    train=train_settings,
    payload_dtype=st.sampled_from(sorted(DTYPES)),
    max_payload_bytes=st.integers(1024, 2**40),
    extra=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
    base_version=st.none() | st.integers(0, 10**6),
)


@settings(max_examples=60, deadline=None)
@given(task=round_tasks)
def test_round_task_json_round_trip(task):
    data = task.to_bytes()
    again = RoundTask.from_bytes(data)
    assert again == task
    assert again.to_bytes() == data
    assert again.claims() == task.claims()


def test_a_sync_task_bytes_carry_no_base_version():
    sync = RoundTask.from_bytes(canonical_json(_task_dict()))
    assert sync.base_version is None and b"base_version" not in sync.to_bytes()
    assert RoundTask.from_bytes(canonical_json(_task_dict(base_version=4))).base_version == 4


@settings(max_examples=60, deadline=None)
@given(lora=lora_settings)
def test_lora_settings_round_trip(lora):
    again = LoraSettings.from_dict(json.loads(canonical_json(lora.to_dict())))
    assert again == lora and again.digest() == lora.digest()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (LoraSettings(alpha=32), LoraSettings(alpha=32.0)),
        (LoraSettings(dropout=0), LoraSettings(dropout=0.0)),
        (
            LoraSettings(target_modules=("v_proj", "q_proj")),
            LoraSettings(target_modules=("q_proj", "v_proj")),
        ),
        (LoraSettings(target_modules=["q_proj", "v_proj"]), LoraSettings()),
    ],
    ids=["alpha-int", "dropout-int", "module-order", "module-list"],
)
def test_equal_settings_have_one_digest(one, other):
    """Otherwise a coordinator reading `alpha = 32` from TOML refuses every honest update as WrongBase."""
    assert one == other and one.digest() == other.digest()


@pytest.mark.parametrize(
    "change", [{"r": 8}, {"alpha": 16.0}, {"dropout": 0.1}, {"target_modules": ("q_proj", "k_proj")}], ids=str
)
def test_any_lora_change_changes_the_digest(change):
    assert LoraSettings(**change).digest() != LoraSettings().digest()


def _task() -> RoundTask:
    return RoundTask(
        project_id="demo",
        round=5,
        nonce="5a" * 16,
        base_adapter_digest="ab" * 32,
        base_model_id="loracommons/demo-tiny",
        base_model_revision="main",
        mode="ffa",
        lora=LoraSettings(),
        train=TrainSettings(),
    )


def _task_dict(**changes) -> dict:
    return {**json.loads(_task().to_bytes()), **changes}


def _without(name: str) -> dict:
    obj = _task_dict()
    del obj[name]
    return obj


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        (_task_dict(admin_command="rm -rf /"), UnknownField),
        (_task_dict(lora={**_task_dict()["lora"], "use_dora": True}), UnknownField),
        (_task_dict(train={**_task_dict()["train"], "code": "import os"}), UnknownField),
        (_without("project_id"), MissingField),
        (_without("nonce"), MissingField),
        (_without("lora"), MissingField),
        (_without("train"), MissingField),
        (_task_dict(mode="krum"), Malformed),
        (_task_dict(payload_dtype="float64"), Malformed),
        (_task_dict(payload_dtype=["float32"]), Malformed),
        (_task_dict(round=-1), Malformed),
        (_task_dict(round="5"), Malformed),
        (_task_dict(base_version=-1), Malformed),
        (_task_dict(base_version=True), Malformed),
        (_task_dict(base_version="3"), Malformed),
        (_task_dict(lora="q_proj"), Malformed),
        (_task_dict(lora={**_task_dict()["lora"], "target_modules": "q_proj"}), Malformed),
        (_task_dict(lora={**_task_dict()["lora"], "alpha": "big"}), Malformed),
        (_task_dict(train=[]), Malformed),
        (_task_dict(train={**_task_dict()["train"], "keep_optimizer": 1}), Malformed),
        (_task_dict(train={**_task_dict()["train"], "keep_optimizer": "yes"}), Malformed),
    ],
    ids=[
        "unknown",
        "unknown-lora",
        "unknown-train",
        "no-project",
        "no-nonce",
        "no-lora",
        "no-train",
        "mode",
        "dtype",
        "dtype-list",
        "round-negative",
        "round-string",
        "base-version-negative",
        "base-version-bool",
        "base-version-string",
        "lora-string",
        "modules-string",
        "alpha-string",
        "train-list",
        "keep-optimizer-int",
        "keep-optimizer-string",
    ],
)
def test_bad_round_task_refused(obj, error):
    with pytest.raises(error) as info:
        RoundTask.from_bytes(canonical_json(obj))
    assert info.type is error


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"[]", Malformed), (b"{", Malformed), (b'{"round": 1, "round": 2}', Malformed)],
    ids=["list", "truncated", "duplicate"],
)
def test_round_task_not_an_object(data, error):
    with pytest.raises(error):
        RoundTask.from_bytes(data)


def test_defaults_fill_optional_fields():
    obj = _task_dict()
    for name in ("payload_dtype", "max_payload_bytes", "extra"):
        del obj[name]
    del obj["lora"]["dropout"], obj["train"]["seed"]
    task = RoundTask.from_bytes(canonical_json(obj))
    assert task == _task()


def test_claims_are_the_manifest_fields_a_task_fixes():
    claims = _task().claims()
    manifest_fields = set(UpdateManifest.__dataclass_fields__)
    assert set(claims) <= manifest_fields
    sender_fields = {
        "format_version",
        "examples",
        "steps",
        "train_loss",
        "eval_loss",  # optional: the sender's evaluation of the adapter it received
        "eval_tokens",
        "rank",  # optional: the rank the sender trained (nested ranks)
        "payload_sha256",
        "payload_bytes",
        "signer",
    }
    assert set(claims) | sender_fields == manifest_fields


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_an_update_built_from_a_task_verifies(dtype):
    task = RoundTask(**{**_task().__dict__, "payload_dtype": dtype})
    adapter = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": (2, 8) if ab == "A" else (8, 2)
        for i in range(2)
        for m in task.lora.target_modules
        for ab in "AB"
    }
    names = modes.get(task.mode).sent_names(adapter)
    spec = TensorSpec({n: adapter[n] for n in names}, frozenset({task.payload_dtype}))
    payload = encode_tensors({n: np.ones(adapter[n], np.float32) for n in names}, task.payload_dtype)
    env = sign_update(SigningKey.generate(), payload, **task.claims(), examples=10, steps=3, train_loss=0.5)
    claims = {k: v for k, v in task.claims().items() if k != "payload_dtype"}
    manifest, tensors = verify_update(
        env, Expected(**claims, spec=spec, max_payload_bytes=task.max_payload_bytes)
    )
    assert manifest.lora_config_digest == task.lora.digest()
    assert sorted(tensors) == names


ADAPTER = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.v_proj.base_layer.weight",
]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("ffa", [ADAPTER[1], ADAPTER[2]]), ("exact", sorted(ADAPTER[:4])), ("fedavg", sorted(ADAPTER[:4]))],
)
def test_update_tensor_names(mode, expected):
    assert modes.get(mode).sent_names(ADAPTER) == expected
