"""The LoRA setup both sides share: demo id, PEFT config, version 0, adapter_config.json."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from loracommons.protocol import lora as L
from loracommons.protocol.task import LoraSettings

from ..client import build_tiny_model

SETTINGS = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_resolve_base_model(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(base_model_path=lambda: tmp_path / "base")
    monkeypatch.setitem(sys.modules, "loracommons.demo", fake)
    assert L.resolve_base_model("loracommons/demo-tiny") == str(tmp_path / "base")
    assert L.resolve_base_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert L.resolve_base_model("/models/mine") == "/models/mine"


def test_hub_revision_only_for_hub_ids(tmp_path):
    assert L.hub_revision("meta-llama/Llama-3.2-1B", "abc123") == "abc123"
    assert L.hub_revision("meta-llama/Llama-3.2-1B", "") is None
    assert L.hub_revision(str(tmp_path), "main") is None  # a local folder has no revisions


def test_lora_config_is_the_project_settings():
    config = L.lora_config(LoraSettings(r=8, alpha=16.0, dropout=0.1, target_modules=("v_proj", "q_proj")))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16.0, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.bias == "none" and config.task_type == "CAUSAL_LM"


def _expected_shapes(settings: LoraSettings, layers: int = 2, hidden: int = 32) -> dict:
    out = {}
    for layer in range(layers):
        for module in settings.target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = (settings.r, hidden)
            out[f"{prefix}.lora_B.weight"] = (hidden, settings.r)
    return out


def test_init_adapter_is_bit_identical_across_nodes(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    rng_before = torch.random.get_rng_state()
    first = L.init_adapter(base, SETTINGS, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not any("lora" in name for name, _ in base.named_modules())  # the base is left bare
    assert {k: v.shape for k, v in first.items()} == _expected_shapes(SETTINGS)
    assert all(v.dtype == np.float32 for v in first.values())
    assert all(not v.any() for k, v in first.items() if ".lora_B." in k)
    assert all(v.std() > 0 for k, v in first.items() if ".lora_A." in k)
    # another node: its own process state, even another base checkpoint of the same architecture
    torch.manual_seed(12345)
    other_base = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "other", seed=1))
    second = L.init_adapter(other_base, SETTINGS, seed=7)
    assert all(first[k].tobytes() == second[k].tobytes() for k in first)
    third = L.init_adapter(other_base, SETTINGS, seed=8)
    assert any(first[k].tobytes() != third[k].tobytes() for k in first if ".lora_A." in k)


def test_coordinator_version_zero_is_init_adapter(model_dir):
    from transformers import AutoModelForCausalLM

    from loracommons.coordinator.config import ProjectConfig, ProjectSection
    from loracommons.coordinator.initial import build_initial_adapter

    cfg = ProjectConfig(project=ProjectSection(base_model=str(model_dir), seed=7), lora=SETTINGS)
    made = build_initial_adapter(cfg)
    want = L.init_adapter(AutoModelForCausalLM.from_pretrained(model_dir), SETTINGS, seed=7)
    assert sorted(made) == sorted(want)
    assert all(made[k].tobytes() == want[k].tobytes() for k in want)


def test_peft_adapter_config_is_what_peft_saves(model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), L.lora_config(SETTINGS))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    saved["target_modules"] = sorted(saved["target_modules"])  # peft writes its set in hash order
    config = L.peft_adapter_config(SETTINGS, str(model_dir))
    assert json.loads(json.dumps(config)) == config
    assert config["lora_alpha"] == 8.0 and isinstance(config["lora_alpha"], float)
    assert {k: v for k, v in saved.items() if k in config} == config


_NO_TORCH = textwrap.dedent("""
    import sys
    for name in ("torch", "peft", "transformers", "flwr"):
        sys.modules[name] = None      # any `import torch` now raises ImportError
    from loracommons.protocol import lora
    assert lora.resolve_base_model("org/model") == "org/model" and lora.DEMO_MODEL_ID
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "peft", "transformers", "flwr")]
    assert all(sys.modules[m] is None for m in loaded), loaded
    print("ok")
""")


def test_imports_without_torch_peft_or_transformers():
    done = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_take_window_is_the_rolled_adapter_cut_to_its_rank():
    rng = np.random.default_rng(0)
    t = {"m.lora_A.weight": rng.normal(size=(4, 3)), "m.lora_B.weight": rng.normal(size=(5, 4))}
    cut = L.take_window(t, 2, 3)  # components 3 and 0
    np.testing.assert_array_equal(cut["m.lora_B.weight"], t["m.lora_B.weight"][:, [3, 0]])
    np.testing.assert_array_equal(cut["m.lora_A.weight"], t["m.lora_A.weight"][[3, 0]])
    again = L.take_rank(L.rolled(t, 3), 2)
    for name in t:
        np.testing.assert_array_equal(cut[name], again[name])
    # rolling A's rows with B's columns leaves the product alone
    r = L.rolled(t, 3)
    np.testing.assert_allclose(r["m.lora_B.weight"] @ r["m.lora_A.weight"],
                               t["m.lora_B.weight"] @ t["m.lora_A.weight"])
    assert L.take_window(t, 2, 0)["m.lora_B.weight"].base is t["m.lora_B.weight"]  # a view at 0
    np.testing.assert_array_equal(L.window_columns(3, 2, 4), [3, 0])
