"""One volunteer's round end to end in one process: task + global adapter in, verified envelope out."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from loracommons.client import client_app
from loracommons.client import model as M
from loracommons.client import trainer as T
from loracommons.client.volunteer import NodeSettings, Volunteer, VolunteerError, load_volunteer
from loracommons.protocol import (
    Envelope,
    Expected,
    SigningKey,
    TensorSpec,
    encode_tensors,
    modes,
    verify_update,
)
from loracommons.protocol.flower_app import read_envelope, task_content
from loracommons.protocol.lora import init_adapter
from loracommons.protocol.task import LoraSettings, RoundTask, TrainSettings

from . import build_tiny_model, skill_records, write_jsonl

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
FAST = TrainSettings(max_steps=4, max_minutes=5.0, batch_size=4, learning_rate=3e-2, warmup_steps=1,
                     seq_len=64, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def global_adapter(model_dir) -> dict[str, np.ndarray]:
    """Version 0 of the global adapter, made as the coordinator makes it."""
    from transformers import AutoModelForCausalLM

    return init_adapter(AutoModelForCausalLM.from_pretrained(model_dir), LORA, seed=7)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    M.clear_cache()


@pytest.fixture
def make_volunteer(tmp_path):
    def make(index: int = 0, max_minutes: float | None = None, records: int = 24) -> Volunteer:
        data = write_jsonl(tmp_path / f"data{index}.jsonl", skill_records(records, seed=index))
        identity = tmp_path / f"id{index}"
        if not identity.exists():
            SigningKey.generate("volunteer").save(identity)
        return Volunteer(NodeSettings(data_path=str(data), identity_path=str(identity), device="cpu",
                                      max_minutes=max_minutes, threads=1))
    return make


def make_task(model_dir, adapter_bytes: bytes, mode: str = "ffa", **changes) -> RoundTask:
    task = RoundTask(project_id="proj-1", round=3, nonce="ab" * 16,
                     base_adapter_digest=hashlib.sha256(adapter_bytes).hexdigest(),
                     base_model_id=str(model_dir), base_model_revision="", mode=mode, lora=LORA, train=FAST)
    return dataclasses.replace(task, **changes)


def expected_for(task: RoundTask, adapter: dict[str, np.ndarray]) -> Expected:
    """What the coordinator expects of this round's updates (as coordinator/admission.py builds it)."""
    names = modes.get(task.mode).sent_names(adapter)
    spec = TensorSpec({n: adapter[n].shape for n in names}, frozenset({task.payload_dtype}))
    claims = task.claims()
    return Expected(project_id=claims["project_id"], round=claims["round"], nonce=claims["nonce"],
                    base_adapter_digest=claims["base_adapter_digest"], base_model_id=claims["base_model_id"],
                    base_model_revision=claims["base_model_revision"],
                    lora_config_digest=claims["lora_config_digest"], spec=spec,
                    max_payload_bytes=spec.payload_bytes(task.payload_dtype))


@pytest.fixture
def spy(monkeypatch):
    """Records what the trainer was given, and the adapter state right after training."""
    calls: list[dict] = []
    real = T.train

    def train(model, tokenizer, data, settings, mode, **kwargs):  # noqa: ANN001, ANN202
        result = real(model, tokenizer, data, settings, mode, **kwargs)
        state = {n: t.detach().clone().numpy() for n, t in get_peft_model_state_dict(model).items()}
        calls.append({"settings": settings, "mode": mode, "state": state, "result": result})
        return result

    monkeypatch.setattr(T, "train", train)
    return calls


@pytest.mark.parametrize("mode,dtype", [("ffa", "float32"), ("exact", "float32"), ("ffa", "bfloat16")])
def test_round_gives_an_envelope_the_coordinator_accepts(model_dir, global_adapter, make_volunteer, spy,
                                                         mode, dtype):
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, mode, payload_dtype=dtype)
    statuses = []
    volunteer = make_volunteer()
    volunteer.on_status = lambda state, details: statuses.append((state, details))
    envelope = volunteer.run_round(task, adapter_bytes)
    manifest, tensors = verify_update(envelope, expected_for(task, global_adapter))
    names = modes.get(mode).sent_names(global_adapter)
    assert sorted(tensors) == names
    if mode == "ffa":
        assert names and all(".lora_B." in n for n in names) and len(names) == len(global_adapter) // 2
    else:
        assert sorted(names) == sorted(global_adapter)
    for name in names:
        assert tensors[name].shape == global_adapter[name].shape
        assert not np.array_equal(tensors[name], global_adapter[name]), name  # it trained
    assert manifest.signer == volunteer.key.public.openssh
    assert manifest.steps == FAST.max_steps and manifest.examples > 0 and np.isfinite(manifest.train_loss)
    assert manifest.payload_dtype == dtype
    assert spy[0]["mode"] == mode
    states = [s for s, _ in statuses]
    assert states[0] == "training" and states[-1] == "sent" and states.count("training") == FAST.max_steps + 1
    assert statuses[-1][1]["digest"] == envelope.digest and statuses[-1][1]["round"] == task.round


def test_ffa_a_is_bit_identical_across_volunteers(model_dir, global_adapter, make_volunteer, spy):
    """Two volunteers with different data and keys, each with a freshly loaded base."""
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, "ffa")
    envelopes = []
    for index in range(2):
        M.clear_cache()  # as on another machine: a new base and a new PEFT wrapper
        envelopes.append(make_volunteer(index).run_round(task, adapter_bytes))
    assert len(spy) == 2
    a_names = [n for n in global_adapter if ".lora_A." in n]
    assert a_names
    for name in a_names:
        first, second = spy[0]["state"][name], spy[1]["state"][name]
        assert first.dtype == second.dtype == global_adapter[name].dtype == np.float32
        assert first.tobytes() == second.tobytes() == global_adapter[name].tobytes(), name
    # B did train, differently on different data
    expected = expected_for(task, global_adapter)
    b = [verify_update(env, expected)[1] for env in envelopes]
    assert any(not np.array_equal(b[0][n], b[1][n]) for n in b[0])
    assert envelopes[0].manifest != envelopes[1].manifest


def test_base_model_is_loaded_at_the_signed_revision(model_dir, global_adapter, make_volunteer, monkeypatch):
    """The update signs `base_model_revision`: the base it trained on must be that revision."""
    loads = []
    real = M.load_base

    def load_base(model_id, revision=None, **kwargs):  # noqa: ANN001, ANN202
        loads.append((model_id, revision))
        return real(model_id, revision, **kwargs)

    monkeypatch.setattr(M, "load_base", load_base)
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, base_model_revision="0123abcd",
                     train=dataclasses.replace(FAST, max_steps=1))
    envelope = make_volunteer().run_round(task, adapter_bytes)
    manifest, _ = verify_update(envelope, expected_for(task, global_adapter))
    assert loads == [(str(model_dir), "0123abcd")] and manifest.base_model_revision == "0123abcd"


def test_wrong_adapter_digest_is_refused(model_dir, global_adapter, make_volunteer, spy):
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer()
    with pytest.raises(VolunteerError, match="digest"):
        volunteer.run_round(make_task(model_dir, adapter_bytes, base_adapter_digest="0" * 64), adapter_bytes)
    tampered = bytearray(adapter_bytes)
    tampered[-1] ^= 1
    with pytest.raises(VolunteerError, match="digest"):
        volunteer.run_round(make_task(model_dir, adapter_bytes), bytes(tampered))
    assert spy == []  # refused before training


@pytest.mark.parametrize("task_minutes,own_minutes,applied", [
    (10.0, 0.5, 0.5), (0.25, 3.0, 0.25), (2.0, None, 2.0), (1.0, 1.0, 1.0),
])
def test_max_minutes_is_the_smaller_of_task_and_volunteer(model_dir, global_adapter, make_volunteer, spy,
                                                          task_minutes, own_minutes, applied):
    adapter_bytes = encode_tensors(global_adapter)
    train = dataclasses.replace(FAST, max_steps=1, max_minutes=task_minutes)
    make_volunteer(max_minutes=own_minutes).run_round(make_task(model_dir, adapter_bytes, train=train),
                                                      adapter_bytes)
    assert spy[0]["settings"].max_minutes == applied
    assert spy[0]["settings"].max_steps == 1


def test_volunteer_cap_stops_training(model_dir, global_adapter, make_volunteer, spy):
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, train=dataclasses.replace(FAST, max_steps=10_000))
    envelope = make_volunteer(max_minutes=0.0005).run_round(task, adapter_bytes)  # 30 ms
    manifest, _ = verify_update(envelope, expected_for(task, global_adapter))
    assert 1 <= manifest.steps < 10_000
    assert spy[0]["result"].stopped_by == "max_minutes"


def test_load_volunteer_from_node_config(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(8))
    SigningKey.generate("volunteer").save(tmp_path / "id")
    volunteer = load_volunteer({"data-path": str(data), "identity": str(tmp_path / "id"), "device": "cpu",
                                "max-minutes": "2.5", "threads": "2"})
    assert volunteer.settings == NodeSettings(str(data), str(tmp_path / "id"), "cpu", 2.5, threads=2)
    assert len(volunteer.records) == 8
    default = load_volunteer({"data-path": str(data), "identity": str(tmp_path / "id")})
    assert default.settings.max_minutes is None and default.settings.device == "auto"


@pytest.mark.parametrize("missing", ["data-path", "identity"])
def test_load_volunteer_names_a_missing_key(tmp_path, missing):
    config = {"data-path": str(tmp_path / "d.jsonl"), "identity": str(tmp_path / "id")}
    del config[missing]
    with pytest.raises(VolunteerError, match=f"lacks '{missing}'.*loracommons join"):
        load_volunteer(config)


def test_load_volunteer_names_a_bad_value(tmp_path):
    with pytest.raises(VolunteerError, match="bad value.*loracommons join"):
        load_volunteer({"data-path": "d", "identity": "i", "max-minutes": "soon"})


@pytest.fixture
def task_identity():
    """Flower's `Message` reads the run id of the task this process runs."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, 22, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def test_client_app_train_handler(model_dir, global_adapter, tmp_path, task_identity):
    from flwr.app import Context, Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto

    data = write_jsonl(tmp_path / "data.jsonl", skill_records(16))
    key = SigningKey.generate("volunteer")
    key.save(tmp_path / "id")
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, "exact")
    content = task_content(task.to_bytes(), adapter_bytes, {"outcome": "admitted", "round": 2})
    # as the node receives it: through Flower's wire format
    message = message_from_proto(message_to_proto(
        Message(content, dst_node_id=1, message_type="train", group_id="3")))
    context = Context(run_id=22, node_id=1, state=RecordDict(), run_config={"project-dir": ""},
                      node_config={"data-path": str(data), "identity": str(tmp_path / "id"), "device": "cpu",
                                   "threads": "1"})
    statuses = []
    client_app.set_status_callback(lambda state, details: statuses.append((state, details)))
    try:
        reply = client_app.app(message=message, context=context)
    finally:
        client_app.set_status_callback(None)
        client_app._volunteers.clear()
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    reply = message_from_proto(message_to_proto(reply))
    assert reply.content["lc"]["encoding"] == "shuffle4-zlib"  # float32 payload, packed for the wire
    expected = expected_for(task, global_adapter)
    envelope = Envelope(*read_envelope(reply.content, expected.max_payload_bytes))
    manifest, tensors = verify_update(envelope, expected)
    assert manifest.signer == key.public.openssh and sorted(tensors) == sorted(global_adapter)
    assert statuses[0] == ("note", {"round": 2, "outcome": "admitted"})  # the earlier round's outcome
    assert statuses[-1][0] == "sent"


def test_update_signs_its_evaluation_of_the_received_adapter(model_dir, global_adapter, make_volunteer, spy):
    """Federated evaluation (issue 11): scored before training, on the volunteer's held-out split."""
    from loracommons.client.volunteer import MIN_EVAL_EXAMPLES

    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes)
    envelope = make_volunteer(records=48).run_round(task, adapter_bytes)  # 5 held out
    manifest, _ = verify_update(envelope, expected_for(task, global_adapter))
    assert manifest.eval_tokens > 0 and np.isfinite(manifest.eval_loss) and manifest.eval_loss > 0
    after = spy[-1]["result"].eval_loss  # the trainer's own figure, after training, on the same split
    assert after is not None and manifest.eval_loss != after
    few = make_volunteer(index=1, records=24).run_round(task, adapter_bytes)  # 2 held out
    assert 24 // 10 < MIN_EVAL_EXAMPLES
    manifest, _ = verify_update(few, expected_for(task, global_adapter))
    assert manifest.eval_loss is None and manifest.eval_tokens == 0 and b"eval_" not in few.manifest


def test_sent_status_compares_the_community_adapter_with_the_volunteers_last_update(
        model_dir, global_adapter, make_volunteer, spy):
    """Issue 16: "community adapter on your held-out data: loss X (your last update alone: Y)"; X is
    what the volunteer signed for the adapter it received, Y its own previous round's adapter."""
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer(records=48)
    sent: list[dict] = []
    volunteer.on_status = lambda state, details: sent.append(details) if state == "sent" else None
    first = volunteer.run_round(make_task(model_dir, adapter_bytes, round=3), adapter_bytes)
    second_task = make_task(model_dir, adapter_bytes, round=4)
    second = volunteer.run_round(second_task, adapter_bytes)
    signed = [verify_update(env, expected_for(task, global_adapter))[0].eval_loss for env, task in
              ((first, make_task(model_dir, adapter_bytes, round=3)), (second, second_task))]
    assert [d["community_loss"] for d in sent] == signed
    own_first = spy[0]["result"].eval_loss  # round 3's trained adapter on the same held-out split
    assert sent[0]["own_loss"] is None and sent[1]["own_loss"] == own_first
    assert own_first < signed[0]  # trained on the same skill: it beats the untrained adapter
    few = make_volunteer(index=1, records=24)  # 2 held out: no evaluation, so no comparison either
    few.on_status = lambda state, details: sent.append(details) if state == "sent" else None
    for r in (3, 4):
        few.run_round(make_task(model_dir, adapter_bytes, round=r), adapter_bytes)
    assert [(d["community_loss"], d["own_loss"]) for d in sent[2:]] == [(None, None), (None, None)]


def carries_given(monkeypatch) -> list[object]:  # noqa: ANN001
    """The `carry` each later `trainer.train` call is given, in order."""
    given: list[object] = []
    real = T.train

    def train(*args, carry=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        given.append(carry)
        return real(*args, carry=carry, **kwargs)

    monkeypatch.setattr(T, "train", train)
    return given


def test_optimizer_state_goes_on_only_into_the_round_that_follows(model_dir, global_adapter, make_volunteer,
                                                                  monkeypatch):
    """`[train] keep_optimizer`: the carry of round r goes into round r + 1 only, in a mode that keeps A
    frozen, under the same settings; a skipped round, another mode or the key off start afresh."""
    given = carries_given(monkeypatch)
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer()
    for rnd in (3, 4, 5, 7):  # 6 missed: round 7's adapter is a version this volunteer did not train from
        volunteer.run_round(make_task(model_dir, adapter_bytes, round=rnd), adapter_bytes)
    assert given[0] is None and given[3] is None
    assert [c.steps for c in given[1:3]] == [FAST.max_steps, 2 * FAST.max_steps]
    off = dataclasses.replace(FAST, keep_optimizer=False)
    volunteer.run_round(make_task(model_dir, adapter_bytes, round=8, train=off), adapter_bytes)
    volunteer.run_round(make_task(model_dir, adapter_bytes, round=9, train=off), adapter_bytes)
    assert given[4:] == [None, None]
    given.clear()
    exact = make_volunteer(1)  # A trains: the aggregate's factors are not the ones the moments were taken on
    for rnd in (1, 2):
        exact.run_round(make_task(model_dir, adapter_bytes, "exact", round=rnd), adapter_bytes)
    other_batch = dataclasses.replace(FAST, batch_size=FAST.batch_size + 1)  # the rate alone may move
    for rnd, train_settings in ((3, FAST), (4, other_batch)):
        exact.run_round(make_task(model_dir, adapter_bytes, round=rnd, train=train_settings), adapter_bytes)
    assert given == [None, None, None, None]


def test_async_tasks_keep_the_optimizer_going_across_versions(model_dir, global_adapter, make_volunteer,
                                                             monkeypatch):
    """Async: a task's round is a serial number (other volunteers' tasks come between), so the carry
    goes on by version: into a task on the version the last one trained from or a later one, not into
    one on an older version, nor between an async task and a sync one."""
    given = carries_given(monkeypatch)
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer()
    for serial, base in ((10, 2), (13, 2), (17, 3), (25, 5), (26, 4)):  # the same version, later, older
        task = make_task(model_dir, adapter_bytes, round=serial, base_version=base)
        volunteer.run_round(task, adapter_bytes)
    assert given[0] is None and given[4] is None
    assert [c.steps for c in given[1:4]] == [FAST.max_steps, 2 * FAST.max_steps, 3 * FAST.max_steps]
    volunteer.run_round(make_task(model_dir, adapter_bytes, round=27), adapter_bytes)  # a sync task
    assert given[5] is None


def test_a_scheduled_learning_rate_keeps_the_optimizer_going(model_dir, global_adapter, make_volunteer,
                                                            monkeypatch):
    """`[round] lr_schedule` changes each task's learning rate from round to round: the carry goes on
    through it (each round trains at its task's rate); any other training setting changed starts afresh."""
    given: list[tuple[object, float]] = []
    real = T.train

    def train(model, tokenizer, data, settings, *args, carry=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        given.append((carry, settings.learning_rate))
        return real(model, tokenizer, data, settings, *args, carry=carry, **kwargs)

    monkeypatch.setattr(T, "train", train)
    adapter_bytes = encode_tensors(global_adapter)
    volunteer = make_volunteer()
    rates = [FAST.learning_rate, FAST.learning_rate * 0.5, FAST.learning_rate * 0.1]
    for rnd, rate in enumerate(rates, start=1):
        task_train = dataclasses.replace(FAST, learning_rate=rate)
        volunteer.run_round(make_task(model_dir, adapter_bytes, round=rnd, train=task_train), adapter_bytes)
    assert [rate for _, rate in given] == rates
    assert given[0][0] is None and [c.steps for c, _ in given[1:]] == [FAST.max_steps, 2 * FAST.max_steps]
    other = dataclasses.replace(FAST, learning_rate=rates[-1], batch_size=FAST.batch_size + 1)
    volunteer.run_round(make_task(model_dir, adapter_bytes, round=4, train=other), adapter_bytes)
    assert given[3][0] is None


# --- the downlink diet (issue 14): ffa tasks carry B only, packed; deltas; refusals before training ---


def _b_trained(adapter: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (t + rng.normal(scale=0.01, size=t.shape) if "lora_B" in n else t).astype(np.float32)
            for n, t in adapter.items()}


@pytest.fixture
def counted_initial(monkeypatch):
    """Counts how often a volunteer regenerates version 0 from the seed."""
    from loracommons.protocol import lora

    calls = []
    real = lora.initial_adapter_for

    def initial_adapter_for(*args):  # noqa: ANN002, ANN202
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(lora, "initial_adapter_for", initial_adapter_for)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ffa_b_only_downlink_trains_from_a_regenerated_from_the_seed(model_dir, global_adapter,
                                                                     make_volunteer, spy, counted_initial,
                                                                     dtype):
    from loracommons.protocol.codec import canonical_digest, round_tensors
    from loracommons.protocol.downlink import SENT, build

    volunteer = make_volunteer()
    for rnd, seed in ((3, 1), (4, 2)):
        adapter = round_tensors(_b_trained(global_adapter, seed), dtype)
        link, data = build(adapter, "ffa", dtype, regenerate=True)
        assert link.tensors == SENT
        task = make_task(model_dir, b"", round=rnd, base_adapter_digest=canonical_digest(adapter),
                         adapter_seed=7, downlink_dtype=dtype)
        envelope = volunteer.run_round(task, data, link)
        verify_update(envelope, expected_for(task, adapter))
        assert all(np.array_equal(spy[-1]["state"][n], adapter[n]) for n in adapter if "lora_A" in n)
    assert len(counted_initial) == 1  # regenerated once, kept for the life of the node


@pytest.mark.parametrize("tamper", ["b", "seed", "dtype"])
def test_tampered_b_or_wrong_seed_is_refused_before_training(model_dir, global_adapter, make_volunteer, spy,
                                                             tamper):
    from loracommons.protocol.codec import canonical_digest
    from loracommons.protocol.downlink import build

    adapter = _b_trained(global_adapter, 1)
    sent = dict(adapter)
    if tamper == "b":
        name = next(n for n in sent if "lora_B" in n)
        sent[name] = sent[name] * 1.5
    link, data = build(sent, "ffa", "float32", regenerate=True)
    task = make_task(model_dir, b"", base_adapter_digest=canonical_digest(adapter),
                     adapter_seed=8 if tamper == "seed" else 7,
                     downlink_dtype="bfloat16" if tamper == "dtype" else "float32")
    with pytest.raises(VolunteerError, match=r"^downlink_mismatch: .*digest"):
        make_volunteer().run_round(task, data, link)
    assert spy == []  # refused before training


def test_delta_needs_the_held_version_and_round_trips_exactly(model_dir, global_adapter, make_volunteer, spy):
    from loracommons.protocol.codec import canonical_digest
    from loracommons.protocol.downlink import Held, build

    v1, v2 = _b_trained(global_adapter, 1), _b_trained(global_adapter, 2)
    d1, d2 = canonical_digest(v1), canonical_digest(v2)
    delta, data = build(v2, "ffa", "float32", regenerate=True, held=Held(d1, v1))
    assert delta.delta_from == d1
    task2 = make_task(model_dir, b"", round=4, base_adapter_digest=d2, adapter_seed=7)
    from loracommons.client import volunteer as volunteer_module

    volunteer_module._HELD.clear()  # a fresh node process: it holds no version
    volunteer = make_volunteer()
    with pytest.raises(VolunteerError, match="^base_unavailable: "):  # a fresh node holds nothing
        volunteer.run_round(task2, data, delta)
    assert spy == []
    link, whole = build(v1, "ffa", "float32", regenerate=True)  # the coordinator then sends it whole
    volunteer.run_round(make_task(model_dir, b"", base_adapter_digest=d1, adapter_seed=7), whole, link)
    envelope = volunteer.run_round(task2, data, delta)
    verify_update(envelope, expected_for(task2, v2))
    assert all(np.array_equal(spy[-1]["state"][n], v2[n]) for n in v2 if "lora_A" in n)
    assert len(spy) == 2
