"""The local training loop and evaluation, on a tiny Llama built from a config."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from loracommons.client import model as M
from loracommons.client.data import DataError, tokenize
from loracommons.client.evaluate import exact_match, generate_responses, heldout_loss, tokenized_loss
from loracommons.client.trainer import Carry, carried_lr_factor, lr_factor, rich_progress, train
from loracommons.protocol import (
    Expected,
    SigningKey,
    TensorSpec,
    encode_tensors,
    modes,
    sign_update,
    verify_update,
)
from loracommons.protocol.envelope import sha256_hex
from loracommons.protocol.lora import init_adapter
from loracommons.protocol.task import LoraSettings, RoundTask, TrainSettings

from . import build_tiny_model, skill_records

SETTINGS = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
ALL_LINEAR = LoraSettings(
    r=4, alpha=8.0,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
FAST = TrainSettings(
    max_steps=8, max_minutes=5.0, batch_size=8, learning_rate=3e-2, warmup_steps=2, seq_len=64
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to busy neighbours
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def initial(model_dir):
    """Version 0 of the global adapter for given LoRA settings, made as the coordinator does."""
    from transformers import AutoModelForCausalLM

    coordinator_base = AutoModelForCausalLM.from_pretrained(model_dir)
    made: dict[LoraSettings, dict] = {}
    return lambda settings: made.setdefault(settings, init_adapter(coordinator_base, settings, seed=0))


@pytest.fixture(scope="module")
def node(model_dir, initial):
    """(base, tokenizer, training data, held-out data, initial adapter) of one volunteer."""
    base, tokenizer = M.load_base(str(model_dir), device="cpu")
    data = tokenize(skill_records(64), tokenizer, seq_len=64)
    heldout = tokenize(skill_records(16, seed=1), tokenizer, seq_len=64)
    yield base, tokenizer, data, heldout, initial
    M.clear_cache()


def _round(node, settings: LoraSettings, mode: str, train_settings: TrainSettings = FAST, **kwargs):
    base, tokenizer, data, _, initial = node
    start = initial(settings)
    model = M.apply_adapter(base, settings, start, mode)
    return start, model, train(model, tokenizer, data, train_settings, mode, **kwargs)


@pytest.mark.parametrize("mode", ["ffa", "exact"])
def test_30_steps_reduce_train_loss(node, mode):
    settings = TrainSettings(max_steps=30, batch_size=8, learning_rate=3e-2, warmup_steps=3, seq_len=64)
    _, _, result = _round(node, ALL_LINEAR, mode, settings, heldout=node[3])
    assert result.steps == 30 and result.stopped_by == "max_steps"
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5, result.losses
    assert result.train_loss == pytest.approx(np.mean(result.losses[-10:]))
    assert result.examples == 64 and result.tokens > 30 * 8 * 50
    assert result.tokens_per_s > 0 and result.seconds > 0
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)


def test_ffa_update_is_exactly_b_and_a_stays_frozen(node):
    start, model, result = _round(node, SETTINGS, "ffa")
    names = modes.get("ffa").sent_names(start)
    assert list(result.update) == names and all(".lora_B." in n for n in names) and len(names) == 4
    assert all(result.update[n].shape == start[n].shape for n in names)
    assert all(result.update[n].any() for n in names)  # B moved away from zero
    after = get_peft_model_state_dict(model)
    for name in start:
        if ".lora_A." in name:
            assert after[name].numpy().tobytes() == start[name].tobytes()
    # the update goes into an envelope that the coordinator's checks accept
    task = RoundTask("p", 1, "ab" * 16, sha256_hex(encode_tensors(start)), "tiny", "main", "ffa",
                     SETTINGS, FAST)
    spec = TensorSpec({n: start[n].shape for n in names})
    key = SigningKey.generate()
    envelope = sign_update(key, encode_tensors(result.update, dtype="float32"), **task.claims(),
                           examples=result.examples, steps=result.steps, train_loss=result.train_loss)
    expected = Expected(**{k: v for k, v in task.claims().items() if k != "payload_dtype"},
                        spec=spec, max_payload_bytes=1 << 20)
    manifest, tensors = verify_update(envelope, expected)
    assert manifest.steps == FAST.max_steps and set(tensors) == set(names)


def test_exact_trains_both_factors(node):
    start, _, result = _round(node, SETTINGS, "exact")
    assert list(result.update) == modes.get("exact").sent_names(start) == sorted(start)
    for name, value in result.update.items():
        assert not np.array_equal(value, start[name]), name


def test_step_budget(node):
    calls = []
    _, _, result = _round(node, SETTINGS, "ffa", on_step=lambda *a: calls.append(a))
    assert result.steps == FAST.max_steps == len(calls) and result.stopped_by == "max_steps"
    assert [c[:2] for c in calls] == [(i, FAST.max_steps) for i in range(1, FAST.max_steps + 1)]
    assert all(math.isfinite(c[2]) and c[3] > 0 for c in calls)


def test_minute_budget(node):
    settings = TrainSettings(max_steps=100_000, max_minutes=0.002, batch_size=8, seq_len=64)
    _, _, result = _round(node, SETTINGS, "ffa", settings)
    assert 1 <= result.steps < settings.max_steps and result.stopped_by == "max_minutes"
    assert result.seconds < 5


def test_the_minute_budget_stops_before_a_step_that_would_end_late(node):
    """Paced at 5 steps a second, 0.5 s holds two steps and a half: the third would end at 0.6 s, past
    the budget, so training stops after two (a slow volunteer sends a smaller update on time)."""
    settings = TrainSettings(max_steps=10, max_minutes=0.5 / 60, batch_size=8, seq_len=64)
    _, _, result = _round(node, SETTINGS, "ffa", settings, max_steps_per_second=5.0)
    assert result.steps == 2 and result.stopped_by == "max_minutes"
    assert result.seconds < 0.5


def test_deterministic_under_seed(node):
    dropout = LoraSettings(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
    runs = [_round(node, dropout, "exact")[2] for _ in range(2)]
    assert encode_tensors(runs[0].update) == encode_tensors(runs[1].update)
    assert runs[0].losses == runs[1].losses
    other = _round(node, dropout, "exact", TrainSettings(**{**FAST.__dict__, "seed": 1}))[2]
    assert encode_tensors(other.update) != encode_tensors(runs[0].update)


def test_accumulation_equals_a_bigger_batch(node):
    big = _round(node, SETTINGS, "exact", TrainSettings(**{**FAST.__dict__, "max_steps": 3}))[2]
    small = TrainSettings(**{**FAST.__dict__, "max_steps": 3, "batch_size": 4, "grad_accum": 2})
    accumulated = _round(node, SETTINGS, "exact", small)[2]
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)
    for name, value in big.update.items():
        np.testing.assert_allclose(accumulated.update[name], value, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_update(node, model_dir):
    plain = _round(node, SETTINGS, "exact")[2]
    base, tokenizer = M.load_base(str(model_dir), device="cpu", gradient_checkpointing=True)
    try:
        model = M.apply_adapter(base, SETTINGS, node[4](SETTINGS), "exact")
        checkpointed = train(model, tokenizer, node[2], FAST, "exact")
    finally:
        M.clear_cache()
    for name, value in plain.update.items():
        np.testing.assert_allclose(checkpointed.update[name], value, atol=1e-5)


def test_payload_dtype_and_bad_inputs(node):
    _, model, result = _round(node, SETTINGS, "ffa", payload_dtype="float16")
    assert all(v.dtype == np.float16 for v in result.update.values())
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, None, node[2], FAST, "ffa")


def test_lr_schedule():
    factors = [lr_factor(s, warmup=2, total=10) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)
    assert lr_factor(0, warmup=10, total=1) == 1.0


def test_carried_lr_schedule_warms_up_once():
    first = [carried_lr_factor(s, 0, warmup=5, total=10) for s in range(10)]
    assert first[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    later = [carried_lr_factor(s, 10, warmup=5, total=10) for s in range(10)]
    assert later[0] == 1.0 and later == sorted(later, reverse=True)  # no warmup: the peak, then decay
    assert later[-1] == pytest.approx(0.1)
    # a warmup longer than a round goes on across rounds
    assert [carried_lr_factor(s, 4, warmup=8, total=4) for s in range(4)] == [5 / 8, 6 / 8, 7 / 8, 1.0]


def test_carry_goes_on_with_the_optimizer(node):
    """Two rounds with a carry = the moments and the warmup go on; a fresh round starts them again."""
    base, tokenizer, data, _, initial = node
    start = initial(SETTINGS)
    model = M.apply_adapter(base, SETTINGS, start, "ffa")
    first = train(model, tokenizer, data, FAST, "ffa")
    assert first.carry is not None and first.carry.steps == FAST.max_steps
    moments = first.carry.optimizer["state"]
    assert moments and all(v["exp_avg_sq"].abs().sum() > 0 for v in moments.values())
    after_first = {n: first.update[n] for n in first.update}

    def second(carry):  # noqa: ANN001, ANN202
        merged = {**start, **after_first}
        model = M.apply_adapter(base, SETTINGS, merged, "ffa")
        return train(model, tokenizer, data, FAST, "ffa", carry=carry)

    carried, fresh = second(first.carry), second(None)
    assert carried.carry.steps == 2 * FAST.max_steps and fresh.carry.steps == FAST.max_steps
    assert carried.update.keys() == fresh.update.keys()
    assert any(not np.array_equal(carried.update[n], fresh.update[n]) for n in carried.update)
    # a carry taken on other shapes is ignored: exactly a fresh start
    other = M.apply_adapter(base, ALL_LINEAR, initial(ALL_LINEAR), "ffa")
    mismatched = train(other, tokenizer, data, FAST, "ffa", carry=first.carry)
    plain = train(M.apply_adapter(base, ALL_LINEAR, initial(ALL_LINEAR), "ffa"), tokenizer, data, FAST, "ffa")
    assert encode_tensors(mismatched.update) == encode_tensors(plain.update)
    assert mismatched.carry.steps == FAST.max_steps


def test_rich_progress_renders_steps(node):
    from rich.console import Console

    out = io.StringIO()
    with rich_progress("round 1", console=Console(file=out, force_terminal=True, width=120)) as on_step:
        _round(node, SETTINGS, "ffa", on_step=on_step)
    text = out.getvalue()
    assert "round 1" in text and f"{FAST.max_steps}/{FAST.max_steps}" in text and "tok/s" in text


def _greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference decoding: one sequence, no padding, no cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_batched_generation_matches_plain_greedy(node):
    base, tokenizer = node[:2]
    from loracommons.client.data import encode_prompt, render_instruction_prompt

    model = M.apply_adapter(base, SETTINGS, _round(node, SETTINGS, "exact")[2].update, "exact")
    records = [{"instruction": "Reverse.", "input": "a" * n, "output": "x"} for n in (1, 4, 9)]
    records.append({"instruction": "Hi.", "input": "", "output": "x"})
    answers = generate_responses(model, tokenizer, records, max_new_tokens=6, batch_size=8)
    assert len(set(answers)) > 1, answers  # a degenerate model would make this test vacuous
    for record, answer in zip(records, answers, strict=True):
        prompt = encode_prompt(tokenizer, render_instruction_prompt(record["instruction"], record["input"]))
        assert answer == tokenizer.decode(_greedy(model, prompt, 6, tokenizer.eos_token_id))
    graded = [{**r, "output": f" {a} "} for r, a in zip(records, answers, strict=True)]
    assert exact_match(model, tokenizer, graded, max_new_tokens=6, batch_size=3) == 1.0
    wrong = [{**r, "output": a + "!"} for r, a in zip(records, answers, strict=True)]
    assert exact_match(model, tokenizer, wrong, max_new_tokens=6) == 0.0
    with pytest.raises(DataError, match="instruction-format"):
        exact_match(model, tokenizer, [{"text": "abc"}])


def test_heldout_loss_is_the_token_mean(node):
    base, tokenizer, _, heldout, initial = node
    model = M.apply_adapter(base, SETTINGS, initial(SETTINGS), "ffa")
    records = skill_records(16, seed=1)
    loss = heldout_loss(model, tokenizer, records, seq_len=64, batch_size=5)
    assert loss == pytest.approx(tokenized_loss(model, heldout, batch_size=16), rel=1e-5)
    # reference: transformers' own per-example loss, weighted by labelled tokens
    total = count = 0
    with torch.no_grad():
        for i in range(len(heldout)):
            batch = heldout.batch([i])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_a_pace_cap_holds_training_to_its_steps_per_second(node):
    """Issue 13: `join --max-steps-per-second` slows a volunteer (the async bench's slow one)."""
    settings = TrainSettings(max_steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, seq_len=32)
    _, _, result = _round(node, SETTINGS, "ffa", settings, max_steps_per_second=2.0)
    assert result.steps == 4 and result.seconds >= 4 / 2.0 - 0.01


def test_the_pace_cap_counts_the_whole_task_from_its_arrival(node):
    """The cap paces a task from `paced_since` (when it arrived): time already spent before training,
    scoring the received adapter for one, counts, so a capped task takes S / cap seconds in all, not
    S / cap plus its fixed costs (the async bench's slow volunteer is then really 5x slower)."""
    settings = TrainSettings(max_steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, seq_len=32)
    arrived = time.monotonic() - 1.5  # 1.5 s of the task's 2 s already spent before training
    _, _, result = _round(node, SETTINGS, "ffa", settings, max_steps_per_second=2.0, paced_since=arrived)
    assert result.steps == 4 and result.seconds < 1.5, result.seconds
    assert time.monotonic() - arrived >= 4 / 2.0 - 0.01


def test_a_carry_follows_its_window_of_components():
    """`Carry.shifted`: a window rolled on by 1 keeps the moments of the components still in it, in
    their new places; the entering one gets a zero first moment and its row's mean second moment."""
    m = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    state = {"state": {0: {"step": torch.tensor(30.0), "exp_avg": m, "exp_avg_sq": v}}, "param_groups": []}
    carry = Carry(state, steps=30, shapes=((2, 4),))
    moved = carry.shifted(1).optimizer["state"][0]
    torch.testing.assert_close(moved["exp_avg"], torch.tensor([[1.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 0.0]]))
    torch.testing.assert_close(moved["exp_avg_sq"],
                               torch.tensor([[2.0, 3.0, 4.0, 3.0], [6.0, 7.0, 8.0, 7.0]]))
    assert moved["step"] == 30 and carry.shifted(1).steps == 30
    gone = carry.shifted(5).optimizer["state"][0]  # a window moved past all of them: every one fresh
    torch.testing.assert_close(gone["exp_avg"], torch.zeros(2, 4))
    torch.testing.assert_close(gone["exp_avg_sq"], torch.tensor([[2.5] * 4, [6.5] * 4]))
    assert carry.shifted(0) is carry
    torch.testing.assert_close(carry.optimizer["state"][0]["exp_avg"], m)  # the original is untouched
