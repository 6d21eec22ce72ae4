"""A volunteer of a smaller rank (nested ranks, ffa): same scale, its columns only, declared."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from loracommons.client import model as M
from loracommons.client.volunteer import NodeSettings, Volunteer, VolunteerError, load_volunteer, round_rank
from loracommons.protocol import SigningKey, TensorSpec, encode_tensors, verify_update
from loracommons.protocol.lora import init_adapter, nested_settings, take_rank, take_window, window_start

from . import build_tiny_model, skill_records, write_jsonl
from .test_volunteer import LORA, expected_for, make_task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def global_adapter(model_dir) -> dict[str, np.ndarray]:
    """Version 0 with B filled in (a zero B would make every rank compute the same thing)."""
    from transformers import AutoModelForCausalLM

    adapter = init_adapter(AutoModelForCausalLM.from_pretrained(model_dir), LORA, seed=7)
    rng = np.random.default_rng(0)
    return {n: (rng.normal(size=v.shape).astype(np.float32) if ".lora_B." in n else v)
            for n, v in adapter.items()}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    M.clear_cache()


def _logits(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits


def test_rank_2_model_computes_the_whole_adapter_and_trains_its_two_components(model_dir, global_adapter):
    """Trainable B_i A_i x alpha_i / r_i (alpha_i = alpha r_i / r) plus the frozen rest = the full model."""
    base, _ = M.load_base(str(model_dir), device="cpu")
    truncated = {n: v.copy() for n, v in global_adapter.items()}
    for name in (n for n in truncated if ".lora_B." in n):
        truncated[name][:, 2:] = 0.0
    cut = _logits(M.apply_adapter(base, LORA, truncated, "ffa"))
    whole = _logits(M.apply_adapter(base, LORA, global_adapter, "ffa"))
    narrow = M.apply_adapter_at_rank(base, LORA, global_adapter, "ffa", 2)
    got = _logits(narrow)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, cut, atol=1e-3)  # the frozen rest mattered
    trainable = {n: p for n, p in narrow.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n and p.shape[-1] == 2 for n, p in trainable.items())
    narrow(input_ids=torch.arange(1, 17).unsqueeze(0)).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert sum(1 for p in narrow.parameters() if p.grad is not None) == len(trainable)  # nothing else
    for p in trainable.values():
        p.grad = None
    # the warm re-apply of another version replaces the frozen rest (hooks do not pile up)
    newer = {n: (v * 0.5 if ".lora_B." in n else v) for n, v in global_adapter.items()}
    again = M.apply_adapter_at_rank(base, LORA, newer, "ffa", 2)
    assert again is narrow
    torch.testing.assert_close(_logits(again), _logits(M.apply_adapter(base, LORA, newer, "ffa")),
                               rtol=1e-5, atol=1e-5)
    narrow = M.apply_adapter_at_rank(base, LORA, global_adapter, "ffa", 2)
    settings = nested_settings(LORA, 2)
    assert (settings.r, settings.alpha / settings.r) == (2, LORA.alpha / LORA.r)
    shapes = M.adapter_shapes(narrow)
    assert all(s[-1] == 2 for n, s in shapes.items() if ".lora_B." in n)
    assert all(s[0] == 2 for n, s in shapes.items() if ".lora_A." in n)
    frozen = [p.requires_grad for n, p in narrow.named_parameters() if ".lora_A." in n]
    assert frozen and not any(frozen)
    with pytest.raises(M.ModelError, match="only the project's rank 4"):
        M.apply_adapter_at_rank(base, LORA, global_adapter, "exact", 2)
    with pytest.raises(M.ModelError, match="outside 1..4"):
        M.apply_adapter_at_rank(base, LORA, global_adapter, "ffa", 5)


def test_a_window_past_the_first_columns_holds_those_components(model_dir, global_adapter):
    """At start 3 of rank 4 the rank-2 layers hold components 3 and 0; the forward is still the whole
    adapter, and the update read back is those columns, in that order."""
    base, _ = M.load_base(str(model_dir), device="cpu")
    whole = _logits(M.apply_adapter(base, LORA, global_adapter, "ffa"))
    narrow = M.apply_adapter_at_rank(base, LORA, global_adapter, "ffa", 2, start=3)
    torch.testing.assert_close(_logits(narrow), whole, rtol=1e-5, atol=1e-5)
    update = M.extract_update(narrow, "ffa")
    want = take_window(global_adapter, 2, 3)
    assert update and set(update) <= set(want)
    for name, value in update.items():
        np.testing.assert_array_equal(value, want[name])
        np.testing.assert_array_equal(value, global_adapter[name][:, [3, 0]])


def _volunteer(tmp_path, records: int = 24, **settings) -> Volunteer:
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(records, seed=1))
    identity = tmp_path / "id"
    SigningKey.generate("volunteer").save(identity)
    return Volunteer(NodeSettings(data_path=str(data), identity_path=str(identity), device="cpu", threads=1,
                                  **settings))


def test_a_capped_volunteer_sends_its_columns_and_declares_its_rank(model_dir, global_adapter, tmp_path):
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, "ffa")
    tries = (tmp_path / f"try{i}" for i in itertools.count())  # a volunteer whose window is past the first
    volunteer = next(v for v in (_volunteer(d, records=48, max_rank=2) for d in tries if d.mkdir() is None)
                     if window_start(task.round, 2, LORA.r, v.fingerprint))  # 5 held out: it scores
    statuses = []
    volunteer.on_status = lambda state, details: statuses.append((state, details))
    envelope = volunteer.run_round(task, adapter_bytes)
    expected = expected_for(task, global_adapter)
    cut = take_rank(global_adapter, 2)
    narrow = dataclasses.replace(expected, spec=TensorSpec({n: cut[n].shape for n in expected.spec.shapes},
                                                           expected.spec.dtypes))
    manifest, tensors = verify_update(envelope, narrow)
    (tmp_path / "full").mkdir()
    full_rank = _volunteer(tmp_path / "full", records=48)
    full, _ = verify_update(full_rank.run_round(task, adapter_bytes), expected)
    # its forward pass is the whole community adapter: the same score as a rank-4 volunteer's
    assert manifest.rank == 2 and manifest.eval_loss == pytest.approx(full.eval_loss, rel=1e-5)
    # its window this round (window_start: the round and its key), not the first two components; it
    # trained from those
    window = take_window(global_adapter, 2, window_start(task.round, 2, LORA.r, volunteer.fingerprint))
    for name, value in tensors.items():
        assert value.shape == window[name].shape and not np.array_equal(value, window[name])  # it trained
        assert np.abs(value - window[name]).mean() < 0.1 * np.abs(value - cut[name]).mean()
    assert ("rank", {"round": task.round, "rank": 2, "project_rank": 4, "why": "--max-rank 2"}) in statuses


def test_a_cap_at_or_above_the_project_rank_trains_the_project_rank(model_dir, global_adapter, tmp_path):
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, "ffa")
    envelope = _volunteer(tmp_path, max_rank=16).run_round(task, adapter_bytes)
    manifest, _ = verify_update(envelope, expected_for(task, global_adapter))
    assert manifest.rank is None and b'"rank"' not in envelope.manifest


def test_a_capped_volunteer_refuses_a_mode_without_nested_ranks(model_dir, global_adapter, tmp_path):
    adapter_bytes = encode_tensors(global_adapter)
    task = make_task(model_dir, adapter_bytes, "fedavg")
    with pytest.raises(VolunteerError, match="mode 'fedavg' trains only its rank 4.*--max-rank is 2"):
        _volunteer(tmp_path, max_rank=2).run_round(task, adapter_bytes)


def test_max_rank_from_the_node_config(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(8))
    SigningKey.generate("volunteer").save(tmp_path / "id")
    config = {"data-path": str(data), "identity": str(tmp_path / "id")}
    assert load_volunteer({**config, "max-rank": "3"}).settings.max_rank == 3
    assert load_volunteer(config).settings.max_rank is None
    with pytest.raises(VolunteerError, match="bad value"):
        load_volunteer({**config, "max-rank": "0"})


@pytest.mark.parametrize(("free", "want"), [(10**12, 16), (16 * 1000 * 2, 16), (16 * 1000 * 2 - 1, 8),
                                            (9000, 4), (5000, 2), (2000, 1), (10, 1)])
def test_affordable_rank_halves_until_the_lora_layers_fit_half_the_free_memory(free, want):
    assert M.affordable_rank(free, per_rank=1000, r=16) == want


def test_round_rank_on_a_short_gpu(model_dir, monkeypatch):
    base, _ = M.load_base(str(model_dir), device="cpu")
    task = make_task(model_dir, b"", "ffa")
    assert round_rank(task, None, base) == (4, "the project's rank")  # CPU: the project's rank
    per_rank = M.rank_bytes(base, LORA, task.train.batch_size * task.train.seq_len)
    assert per_rank > 0
    monkeypatch.setattr(M, "free_device_bytes", lambda device: per_rank * 2)  # as a CUDA device would say
    rank, why = round_rank(task, None, base)
    assert rank == 1 and "GiB free on the GPU" in why
    assert round_rank(dataclasses.replace(task, mode="exact"), None, base)[0] == 4
    assert round_rank(task, 3, base) == (3, "--max-rank 3")
