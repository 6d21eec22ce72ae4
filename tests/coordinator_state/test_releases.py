"""Signed release folders: the chain, crash recovery, and loading with plain peft."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from loracommons.coordinator import releases as rel
from loracommons.coordinator.releases import (
    ReleaseError,
    load_chain,
    publish_release,
    reconcile,
    verify_local_chain,
)
from loracommons.coordinator.store import Store
from loracommons.protocol.codec import decode_tensors
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.lora import peft_adapter_config
from loracommons.protocol.release import ReleaseManifest, updates_digest, verify_chain

from . import ADAPTER_CONFIG, SECTION, adapter, publish_n, publish_next, volunteer_fp

KEY = SigningKey.generate("coordinator")


@pytest.fixture
def project(tmp_path: Path):
    store = Store(tmp_path)
    yield tmp_path, store
    store.close()


def test_three_releases_chain_and_verify(project):
    folder, store = project
    signed = publish_n(folder, store, KEY, 3)
    chain = load_chain(folder)
    assert [s.digest for s in chain] == [s.digest for s in signed]
    manifests = verify_chain(chain, KEY.public)
    assert [m.version for m in manifests] == [1, 2, 3]
    assert manifests[1].previous == signed[0].digest and manifests[2].previous == signed[1].digest
    assert manifests[2].updates_digest == updates_digest([f"{103:064x}", f"{3:064x}"])
    assert manifests[2].metrics["train_loss"] == pytest.approx(2 / 3)
    assert verify_local_chain(folder, KEY.public.fingerprint[:32]) == manifests
    assert [(r.version, r.manifest_digest) for r in store.releases()] == [
        (i + 1, s.digest) for i, s in enumerate(signed)]
    v3 = folder / "releases" / "v3"
    assert sorted(p.name for p in v3.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "release.json"]
    for name, info in manifests[2].files.items():
        data = (v3 / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info["size"], info["sha256"])
    tensors = decode_tensors((v3 / "adapter_model.safetensors").read_bytes(), max_bytes=1 << 20)
    for name, value in adapter(3).items():
        np.testing.assert_array_equal(tensors[name], value)
    assert json.loads((v3 / "adapter_config.json").read_text()) == ADAPTER_CONFIG
    # The adapter of each version is also kept as a content-addressed blob.
    row = store.latest_release()
    assert store.blobs.get(row.adapter_digest) == (v3 / "adapter_model.safetensors").read_bytes()


def test_model_card_says_what_a_user_needs(project):
    folder, store = project
    publish_n(folder, store, KEY, 2)
    card = (folder / "releases" / "v2" / "README.md").read_text()
    for needle in ("tiny/llama", "v2", "round 2", "Contributors to this release: 2", "train_loss",
                   "PeftModel.from_pretrained", f"--pin {KEY.public.fingerprint}",
                   load_chain(folder)[0].digest, "0101-0101-0101-0101"):
        assert needle in card, needle


def test_model_card_of_the_demo_base_points_at_the_embedded_model(project):
    folder, store = project
    demo = dataclasses.replace(SECTION, base_model="loracommons/demo-tiny")
    publish_release(folder, store, KEY, demo, 1, 1, adapter(1), ADAPTER_CONFIG)
    card = (folder / "releases" / "v1" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained(base_model_path())" in card


def test_version_must_follow_and_republishing_is_idempotent(project):
    folder, store = project
    first = publish_next(folder, store, KEY)
    with pytest.raises(ReleaseError, match="next release is v2"):
        publish_release(folder, store, KEY, SECTION, 3, 3, adapter(3), ADAPTER_CONFIG)
    again = publish_release(folder, store, KEY, SECTION, 1, 1, adapter(9), ADAPTER_CONFIG)
    assert again.digest == first.digest and len(store.releases()) == 1
    with pytest.raises(ReleaseError, match="already exists for round 1"):
        publish_release(folder, store, KEY, SECTION, 1, 5, adapter(9), ADAPTER_CONFIG)


def test_tampered_local_file_fails_verification(project):
    folder, store = project
    publish_n(folder, store, KEY, 2)
    weights = folder / "releases" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="v1: adapter_model.safetensors differs"):
        verify_local_chain(folder, KEY.public)
    with pytest.raises(ReleaseError, match="chain"):
        verify_local_chain(folder, SigningKey.generate("coordinator").public)


def test_reconcile_adopts_a_release_renamed_but_not_recorded(project, monkeypatch):
    folder, store = project
    publish_n(folder, store, KEY, 2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between rename and commit")

    monkeypatch.setattr(store, "add_release", crash)
    with pytest.raises(KeyboardInterrupt):
        publish_next(folder, store, KEY)
    monkeypatch.undo()
    assert (folder / "releases" / "v3").is_dir() and store.latest_release().version == 2
    report = reconcile(folder, store, KEY)
    assert report.adopted == [3] and report.removed == []
    assert [r.version for r in store.releases()] == [1, 2, 3]
    assert [m.version for m in verify_local_chain(folder, KEY.public)] == [1, 2, 3]
    assert reconcile(folder, store, KEY).adopted == []  # idempotent
    publish_next(folder, store, KEY)
    assert [m.version for m in verify_local_chain(folder, KEY.public)] == [1, 2, 3, 4]


def test_reconcile_removes_leftovers_that_do_not_chain(project):
    folder, store = project
    publish_n(folder, store, KEY, 2)
    root = folder / "releases"
    (root / ".tmp-v3-abc").mkdir()
    (root / ".tmp-v3-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (root / ".trash-v9-00").mkdir()
    # v3 signed by another key, and a v5 that skips v4: neither may join the chain.
    other = SigningKey.generate("coordinator")
    scratch = folder / "scratch"
    scratch_store = Store(scratch)
    publish_n(scratch, scratch_store, other, 3)
    (scratch / "releases" / "v3").rename(root / "v3")
    (root / "v5").mkdir()
    (root / "v5" / "release.json").write_text("{}")
    report = reconcile(folder, store, KEY)
    assert report.adopted == []
    assert sorted(report.removed) == sorted([".tmp-v3-abc", ".trash-v9-00", "v3", "v5"])
    assert sorted(p.name for p in root.iterdir()) == ["v1", "v2"]
    assert [m.version for m in verify_local_chain(folder, KEY.public)] == [1, 2]
    scratch_store.close()


def test_reconcile_refuses_damage_to_recorded_releases(project):
    folder, store = project
    publish_n(folder, store, KEY, 2)
    (folder / "releases" / "v2" / "release.json").unlink()
    with pytest.raises(ReleaseError, match="v2 has no release.json"):
        reconcile(folder, store, KEY)


_PUBLISHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from loracommons.coordinator.store import Store
    from loracommons.protocol.identity import SigningKey
    from coordinator_state import publish_next
    folder = Path(sys.argv[1])
    store, key = Store(folder), SigningKey.load(sys.argv[2])
    print("ready", flush=True)
    while True:
        publish_next(folder, store, key)
""")


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6])
def test_kill_9_while_publishing_keeps_the_chain(tmp_path: Path, delay: float):
    key_path = KEY.save(tmp_path / "release_key")
    folder = tmp_path / "proj"
    tests_dir = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(folder), str(key_path), tests_dir],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30  # under load the first release can take longer than `delay`
        while not (folder / "releases" / "v1").is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # then the kill lands at some point of a later release
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = Store(folder)
    reconcile(folder, store, KEY)
    manifests = verify_local_chain(folder, KEY.public)
    recorded = [r.version for r in store.releases()]
    assert recorded == [m.version for m in manifests] == list(range(1, len(recorded) + 1))
    assert sorted(p.name for p in (folder / "releases").iterdir()) == sorted(f"v{v}" for v in recorded)
    publish_next(folder, store, KEY)  # and the next release continues the chain
    assert len(verify_local_chain(folder, KEY.public)) == len(recorded) + 1
    store.close()


def test_peft_adapter_config_is_plain_json():
    from loracommons.protocol.task import LoraSettings

    config = peft_adapter_config(LoraSettings(r=4, alpha=8.0, target_modules=("v_proj", "q_proj")), "base/x")
    assert json.loads(json.dumps(config)) == config
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "base/x" and config["r"] == 4 and config["inference_mode"]


def test_release_loads_with_plain_peft_and_gives_the_same_logits(project, tmp_path: Path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from loracommons.protocol.task import LoraSettings

    folder, store = project
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    lora = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    adapter_config = peft_adapter_config(lora, str(base_dir), "main")
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero; give it values so the adapter changes the logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    publish_release(folder, store, KEY, SECTION, 1, 1, state, adapter_config, metrics={"eval_loss": 1.0},
                    contributors=[volunteer_fp(1)])

    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), folder / "releases" / "v1")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
        plain = LlamaForCausalLM.from_pretrained(base_dir)(ids).logits
    assert torch.allclose(want, got, atol=1e-6)
    assert not torch.allclose(plain, got, atol=1e-3)  # the adapter really is applied
    manifest = ReleaseManifest.from_dict(json.loads(load_chain(folder)[0].manifest))
    assert manifest.base_model_id == SECTION.base_model


def test_release_dir_layout():
    assert rel.release_dir("/p", 7) == Path("/p/releases/v7")
