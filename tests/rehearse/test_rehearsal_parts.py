"""The rehearsal's parts that need no Ray: data splits, who is hostile, what each fault sends."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from loracommons.client import rehearsal_faults
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.round import Round
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.envelope import open_envelope
from loracommons.protocol.identity import SigningKey
from loracommons.rehearsal_data import Split, SplitError
from loracommons.rehearse import Hostile, RehearsalError

from ..coordinator.conftest import Signer, make_global, make_update

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"instruction": f"skill {i % 5}", "input": str(i), "output": str(i), "source": f"s{i % 3}"}
        for i in range(100)]


def test_split_specs_parse_and_refuse():
    assert Split.parse("iid") == Split("iid")
    assert Split.parse("by-field:source") == Split("by-field", field="source")
    assert Split.parse("dirichlet:0.5") == Split("dirichlet", field="instruction", alpha=0.5)
    assert Split.parse("dirichlet:2:source") == Split("dirichlet", field="source", alpha=2.0)
    for bad in ("", "iid:x", "by-field", "by-field:", "dirichlet:0", "dirichlet:x", "shards:3"):
        with pytest.raises(SplitError, match="--split"):
            Split.parse(bad)


@pytest.mark.parametrize("spec", ["iid", "by-field:source", "by-field:instruction", "dirichlet:0.1",
                                  "dirichlet:100"])
@pytest.mark.parametrize("n", [1, 3, 7, 40])
def test_every_split_deals_every_record_once_and_no_share_empty(spec, n):
    shares = Split.parse(spec).deal(ROWS, n, seed=1)
    assert len(shares) == n and all(shares)
    dealt = sorted(r["input"] for share in shares for r in share)
    assert dealt == sorted(r["input"] for r in ROWS)
    assert shares == Split.parse(spec).deal(ROWS, n, seed=1)  # reproducible


def test_by_field_keeps_each_volunteer_to_one_group_when_there_are_more_volunteers():
    shares = Split.parse("by-field:source").deal(ROWS, 6, seed=0)
    assert all(len({r["source"] for r in share}) == 1 for share in shares)
    assert Counter(share[0]["source"] for share in shares) == {"s0": 2, "s1": 2, "s2": 2}


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    def labels_per_share(alpha: float) -> float:
        shares = Split("dirichlet", field="instruction", alpha=alpha).deal(ROWS * 4, 10, seed=0)
        return float(np.mean([len({r["instruction"] for r in s}) for s in shares]))

    assert labels_per_share(0.05) < 2.5 < labels_per_share(100.0)


def test_split_refusals_are_one_line():
    with pytest.raises(SplitError, match="cannot give 200 volunteers"):
        Split("iid").deal(ROWS, 200)
    with pytest.raises(SplitError, match="no field 'team'"):
        Split("by-field", field="team").deal(ROWS, 3)


def test_hostile_spec_and_assignment():
    assert Hostile.parse(None) == Hostile()
    spec = Hostile.parse("0.2:model_replacement,weight_inflation")
    chosen = spec.assign(20, seed=3)
    assert len(chosen) == 4 and Counter(chosen.values()) == {"model_replacement": 2, "weight_inflation": 2}
    assert chosen == spec.assign(20, seed=3) and Hostile().assign(20, 0) == {}
    for bad in ("0.2", "2:model_replacement", "0:weight_inflation", "x:model_replacement", "0.1:pickle"):
        with pytest.raises(RehearsalError, match="--hostile"):
            Hostile.parse(bad)


def _honest(rng: np.random.Generator, cfg: ProjectConfig) -> tuple[dict, Signer, SigningKey, list]:
    g = make_global(rng)
    signer = Signer(cfg, g)
    key = SigningKey.generate()
    updates = [make_update(g, cfg.aggregation.mode, rng) for _ in range(5)]
    return g, signer, key, updates


def _open_project() -> ProjectConfig:
    """What `coordinator init` gives an open project: median clipping, a weight cap of 256."""
    base = ProjectConfig()
    return ProjectConfig(
        round=dataclasses.replace(base.round, volunteers_per_round=10),
        aggregation=dataclasses.replace(base.aggregation, clip="median", max_examples_weight=256))


def test_model_replacement_sends_a_hundred_times_the_delta_signed_by_the_volunteer():
    rng = np.random.default_rng(0)
    cfg = _open_project()
    g, signer, key, updates = _honest(rng, cfg)
    honest = signer.envelope(updates[0], key=key)
    hostile = rehearsal_faults.get("model_replacement")(honest, signer.task, encode_tensors(g), key)
    manifest, public = open_envelope(hostile, max_payload_bytes=1 << 24)
    assert public.fingerprint == key.public.fingerprint and manifest.examples == 10
    sent = decode_tensors(hostile.payload, max_bytes=1 << 24)
    honest_sent = decode_tensors(honest.payload, max_bytes=1 << 24)
    for name, value in sent.items():
        want = g[name] + 100 * (np.asarray(honest_sent[name], np.float32) - g[name])
        np.testing.assert_allclose(np.asarray(value, np.float32), want, rtol=0.02, atol=0.05)


def test_the_open_project_defaults_neutralize_both_faults():
    rng = np.random.default_rng(1)
    cfg = _open_project()
    g, signer, _, updates = _honest(rng, cfg)
    rnd = Round(cfg, signer.round, signer.nonce, g, signer.digest)
    keys = [SigningKey.generate() for _ in updates]
    envelopes = [signer.envelope(u, key=k, examples=50) for u, k in zip(updates, keys, strict=True)]
    envelopes[0] = rehearsal_faults.model_replacement(envelopes[0], signer.task, encode_tensors(g), keys[0])
    envelopes[1] = rehearsal_faults.weight_inflation(envelopes[1], signer.task, encode_tensors(g), keys[1])
    records = [rnd.offer(e) for e in envelopes]
    assert all(r.accepted for r in records)
    assert records[1].capped and records[1].examples == 256 and "10" in records[1].message
    result = rnd.close()
    assert [a.update_digest for a in result.annotations] == [records[0].update_digest]


def test_unknown_fault_is_one_line():
    with pytest.raises(ValueError, match="unknown hostile behaviour 'pickle'"):
        rehearsal_faults.get("pickle")


def test_the_rehearse_extra_alone_pulls_ray():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(extras["dependencies"] + extras["optional-dependencies"]["train"])
    assert "simulation" not in deps and "ray" not in deps
    rehearse = extras["optional-dependencies"]["rehearse"]
    assert any(d.startswith("flwr[simulation]") for d in rehearse)
    assert "rehearse" in extras["optional-dependencies"]["test"][0]  # CI tests it


def test_node_files_are_what_join_sets(tmp_path):
    from loracommons.client.rehearsal import NODE_FILE, node_config_of, volunteer_dir

    d = volunteer_dir(tmp_path, 7)
    d.mkdir(parents=True)
    (d / NODE_FILE).write_text(json.dumps({"data-path": "x.jsonl", "identity": "key"}))
    assert d.name == "0007" and node_config_of(tmp_path, 7) == {"data-path": "x.jsonl", "identity": "key"}


def test_prepare_writes_the_folder_and_refuses_what_cannot_run(tmp_path):
    from loracommons.coordinator.config import init_project, load_config
    from loracommons.rehearse import RehearsalSettings, prepare

    project = tmp_path / "proj"
    init_project(project, "loracommons/demo-tiny")
    live = sorted(p.name for p in project.iterdir())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:12]))
    settings = RehearsalSettings(volunteers=5, data=data, rounds=2, steps=3,
                                 hostile=Hostile.parse("0.4:weight_inflation"))
    folder = prepare(project, settings)
    cfg = load_config(folder)
    assert (cfg.round.rounds, cfg.train.max_steps, cfg.round.timeout_s) == (2, 3, 86400.0)
    assert cfg.project.id == load_config(project).project.id and folder.parent == project / "rehearsals"
    roster = json.loads((folder / "roster.json").read_text())
    assert [r["behaviour"] for r in roster].count("weight_inflation") == 2
    assert sum(r["records"] for r in roster) == 12
    assert sorted(p.name for p in project.iterdir()) == sorted([*live, "rehearsals"])
    for bad in (dataclasses.replace(settings, volunteers=1), dataclasses.replace(settings, rounds=0)):
        with pytest.raises(RehearsalError):
            prepare(project, bad)
