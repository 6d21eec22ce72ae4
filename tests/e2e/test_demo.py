"""`loracommons demo` end to end (short settings), and the downloaded adapter loaded by plain peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.procs import cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

# Runs with loracommons made unimportable: the loading path is plain transformers + peft.
PLAIN_PEFT = r"""
import sys
sys.modules["loracommons"] = None
import numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
ids = tok("### Instruction:\nReverse.\n### Input:\nlamp\n### Response:\n", return_tensors="pt").input_ids
with torch.no_grad():
    np.save(out, model(input_ids=ids).logits.numpy())
"""


def coordinator_logits(project: Path, base: Path) -> np.ndarray:
    """Logits from the coordinator's own copy: its aggregated adapter blob, through loracommons."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.client.model import apply_adapter
    from loracommons.coordinator.config import load_config
    from loracommons.coordinator.initial import decode_adapter
    from loracommons.coordinator.store import Store

    cfg = load_config(project)
    store = Store(project)
    try:
        latest = store.latest_release()
        tensors = decode_adapter(store.blobs.get(latest.adapter_digest))
    finally:
        store.close()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = apply_adapter(model, cfg.lora, tensors, cfg.aggregation.mode).eval()
    ids = tok("### Instruction:\nReverse.\n### Input:\nlamp\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def run_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`loracommons demo --out OUT ARGS`; a failure says the demo's output and the tail of its logs."""
    try:
        return cli("demo", *args, "--out", str(out))
    except AssertionError as exc:
        logs = sorted((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []
        tails = "".join(f"\n--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-2500:]}"
                        for log in logs)
        raise AssertionError(f"{exc}{tails}") from None


def test_demo_short_run_and_plain_peft_load(tmp_path, monkeypatch):
    from loracommons.cli import QUIET_ENV
    from loracommons.demo import base_model_path
    from tests.test_cli_quiet import NOISE

    for name in QUIET_ENV:  # quiet because the demo makes itself so, not because a test did
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "demo"
    result = run_demo(out, "--volunteers", "2", "--rounds", "2", "--steps-per-round", "4",
                      "--publish-every", "1")
    assert "downloaded and verified the community adapter" in result.stdout
    # issue 16: the demo's output has no library progress bars or warnings
    assert not [noise for noise in NOISE if noise in result.stdout + result.stderr], result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "volunteer-0 (local only)", "volunteer-1 (local only)",
                                     "pooled data, one trainer", "community"}
    assert [row["skill"] for row in report["holders"]] == ["reverse", "vowels"]
    assert report["holders"][0]["holders"] == ["volunteer-0"]
    assert "a release every 1 rounds" in " ".join(result.stdout.split())
    assert report["skills"] == ["reverse", "vowels"]
    # the references trained beside the federation, as many steps as each volunteer made
    references = report["references"]
    assert references["steps"] == 2 * 4 and "beside the federation" in references["trained"]
    assert (out / "report.png").stat().st_size > 10_000
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json",
                                                             "adapter_model.safetensors", "release.json"}
    plain = tmp_path / "plain.npy"
    args = [str(base_model_path()), str(out / "adapter"), str(plain)]
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, *args], check=True, timeout=120)
    ours = coordinator_logits(out / "project", base_model_path())
    np.testing.assert_allclose(np.load(plain), ours, rtol=1e-5, atol=1e-5)
    # the community adapter differs from the base (it learned something)
    assert report["models"]["community"]["reverse"]["heldout_loss"] < \
        report["models"]["base"]["reverse"]["heldout_loss"]
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "the demo left processes running"


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("demo", "--out", str(tmp_path), check=False)
    assert result.returncode != 0 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_async_schedule_reports_each_volunteers_contribution(tmp_path):
    """Issue 13: `loracommons demo --schedule async` works, its report says what each volunteer gave."""
    from loracommons.coordinator.store import Store

    out = tmp_path / "demo"
    result = run_demo(out, "--volunteers", "2", "--rounds", "3", "--steps-per-round", "4",
                      "--publish-every", "1", "--schedule", "async")
    assert "what each volunteer contributed (async schedule)" in " ".join(result.stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert report["schedule"] == "async"
    rows = {row["volunteer"]: row for row in report["contributions"]}
    assert set(rows) == {"volunteer-0", "volunteer-1"}
    assert all(row["admitted"] >= 1 and row["examples"] > 0 for row in rows.values()), rows
    store = Store(out / "project")
    try:
        versions = store.rounds()
        admitted = [u for r in versions for u in store.round_updates(r.round) if u.outcome == "admitted"]
    finally:
        store.close()
    assert [r.status for r in versions] == ["aggregated"] * 3 and all(r.admitted == 2 for r in versions), [
        (r.round, r.status, r.admitted, r.rejected, r.note) for r in versions]
    assert sum(row["admitted"] for row in rows.values()) == len(admitted) == 6
    assert all(u.staleness is not None for u in admitted)
    assert (out / "adapter" / "release.json").exists()
