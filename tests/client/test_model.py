"""Base model loading, device and dtype choice, and the LoRA adapter round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from loracommons.client import model as M
from loracommons.protocol import modes
from loracommons.protocol.lora import init_adapter
from loracommons.protocol.task import LoraSettings

from . import build_tiny_model

SETTINGS = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _fresh_cache_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to busy neighbours
    yield
    M.clear_cache()
    torch.set_num_threads(threads)


def test_pick_device_and_dtype():
    assert M.pick_device("cpu") == torch.device("cpu")
    assert M.pick_device(" CPU ") == torch.device("cpu")
    assert M.pick_dtype(torch.device("cpu")) == torch.float32
    auto = M.pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                         else "cpu")
    with pytest.raises(M.ModelError, match="expected one of auto, cpu, cuda, cuda:N, mps"):
        M.pick_device("gpu")
    with pytest.raises(M.ModelError, match="cuda:x"):
        M.pick_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_pick_device_without_cuda():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(M.ModelError, match=f"--device {spec}: CUDA is not available"):
            M.pick_device(spec)


def test_load_base_offline_and_cached(model_dir):
    base, tokenizer = M.load_base(str(model_dir), device="cpu")
    assert not any(p.requires_grad for p in base.parameters())
    assert tokenizer.chat_template and tokenizer.eos_token == "</s>"
    assert M.load_base(str(model_dir), device="cpu")[0] is base
    other, _ = M.load_base(str(model_dir), device="cpu", gradient_checkpointing=True)
    assert other is not base and any(getattr(m, "gradient_checkpointing", False) for m in other.modules())
    assert len(M._BASE_CACHE) == 1  # one base at a time: the previous one is released


def test_load_base_asks_the_hub_for_the_revision(model_dir, monkeypatch):
    import transformers

    asked = []

    def from_pretrained(path, **kwargs):  # noqa: ANN001, ANN202
        asked.append((str(path), kwargs.get("revision")))
        raise OSError("not fetched in a test")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    for model_id in ("org/model", str(model_dir)):
        with pytest.raises(M.ModelError, match="not fetched"):
            M.load_base(model_id, revision="0123abcd", device="cpu")
    assert asked == [("org/model", "0123abcd"), (str(model_dir), None)]  # a local folder has no revisions


def test_load_base_errors(model_dir, tmp_path):
    with pytest.raises(M.ModelError, match="cannot load base model .*HF_HUB_OFFLINE"):
        M.load_base(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(M.ModelError, match="4-bit loading .*needs a CUDA GPU"):
        M.load_base(str(model_dir), device="cpu", load_in_4bit=True)


def _expected_shapes(settings: LoraSettings, layers: int = 2, hidden: int = 32) -> dict:
    out = {}
    for layer in range(layers):
        for module in settings.target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = (settings.r, hidden)
            out[f"{prefix}.lora_B.weight"] = (hidden, settings.r)
    return out


def _random_adapter(settings: LoraSettings, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in _expected_shapes(settings).items()}


@pytest.mark.parametrize(("mode", "a_trains"), [("ffa", False), ("exact", True), ("fedavg", True)])
def test_apply_adapter_loads_exactly_and_freezes_per_mode(model_dir, mode, a_trains):
    base, _ = M.load_base(str(model_dir), device="cpu")
    tensors = _random_adapter(SETTINGS)
    model = M.apply_adapter(base, SETTINGS, tensors, mode)
    state = get_peft_model_state_dict(model)
    assert all(np.array_equal(state[k].numpy(), v) for k, v in tensors.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if ".lora_B." in n or (a_trains and ".lora_A." in n)}


def test_zero_b_adapter_leaves_the_base_output(model_dir):
    base, _ = M.load_base(str(model_dir), device="cpu")
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = M.apply_adapter(base, SETTINGS, init_adapter(base, SETTINGS, 0), "ffa")
        assert torch.equal(model(input_ids=ids).logits, before)
        model = M.apply_adapter(base, SETTINGS, _random_adapter(SETTINGS), "ffa")
        assert not torch.equal(model(input_ids=ids).logits, before)


def test_apply_adapter_reuses_one_wrapper_across_rounds(model_dir):
    base, _ = M.load_base(str(model_dir), device="cpu")
    models = [M.apply_adapter(base, SETTINGS, _random_adapter(SETTINGS, seed=i), "ffa") for i in range(3)]
    assert models[0] is models[1] is models[2]
    assert sum(1 for n, _ in base.named_modules() if n.endswith("lora_A")) == 4
    wider = LoraSettings(r=2, alpha=4.0, target_modules=("q_proj", "k_proj", "v_proj"))
    model = M.apply_adapter(base, wider, _random_adapter(wider), "exact")
    assert model is not models[0]
    assert sum(1 for n, _ in base.named_modules() if n.endswith("lora_A")) == 6
    assert set(M.adapter_shapes(model)) == set(_expected_shapes(wider))


def test_reapply_copies_into_the_factors_without_reloading_through_peft(model_dir, monkeypatch):
    base, _ = M.load_base(str(model_dir), device="cpu")
    M.apply_adapter(base, SETTINGS, _random_adapter(SETTINGS, seed=1), "ffa")
    params = {n: p for n, p in M._wrapper(base, SETTINGS).named_parameters() if ".lora_" in n}

    def no_peft_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("re-apply went through set_peft_model_state_dict")

    monkeypatch.setattr(M, "set_peft_model_state_dict", no_peft_load)
    tensors = _random_adapter(SETTINGS, seed=2)
    model = M.apply_adapter(base, SETTINGS, tensors, "exact")
    state = get_peft_model_state_dict(model)
    assert all(np.array_equal(state[k].numpy(), v) for k, v in tensors.items())
    # the same parameter objects, written in place (an optimizer built on them stays valid)
    assert all(p is params[n] for n, p in model.named_parameters() if ".lora_" in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in params if ".lora_A." in n or ".lora_B." in n}


def test_apply_adapter_refuses_what_does_not_fit(model_dir):
    base, _ = M.load_base(str(model_dir), device="cpu")
    tensors = _random_adapter(SETTINGS)
    name = sorted(tensors)[0]
    with pytest.raises(M.ModelError, match="missing"):
        M.apply_adapter(base, SETTINGS, {k: v for k, v in tensors.items() if k != name}, "ffa")
    with pytest.raises(M.ModelError, match="has shape"):
        M.apply_adapter(base, SETTINGS, {**tensors, name: tensors[name].T}, "ffa")
    with pytest.raises(M.ModelError, match="mode 'avg'"):
        M.apply_adapter(base, SETTINGS, tensors, "avg")


@pytest.mark.parametrize("mode", ["ffa", "exact"])
def test_extract_update_names_and_dtypes(model_dir, mode):
    base, _ = M.load_base(str(model_dir), device="cpu")
    tensors = _random_adapter(SETTINGS)
    model = M.apply_adapter(base, SETTINGS, tensors, mode)
    update = M.extract_update(model, mode)
    assert list(update) == modes.get(mode).sent_names(tensors)
    assert all(np.array_equal(update[k], tensors[k]) for k in update)
    assert all(v.dtype == np.float16 for v in M.extract_update(model, mode, "float16").values())
    bf16 = M.extract_update(model, mode, "bfloat16")
    assert all(v.dtype == np.float32 and not (v.view(np.uint32) & 0xFFFF).any() for v in bf16.values())
    with pytest.raises(M.ModelError, match="payload dtype 'int8'"):
        M.extract_update(model, mode, "int8")
