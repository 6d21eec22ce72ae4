"""The release's model card is Hub-ready: `huggingface_hub.ModelCard` parses it (offline) and finds
the base model, the library, the license, the tags and the federated evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from loracommons.coordinator.config import (
    AggregationSection,
    PrivacySection,
    ProjectConfig,
    RoundSection,
)
from loracommons.coordinator.releases import publish_release
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey

from . import ADAPTER_CONFIG, SECTION, adapter, volunteer_fp

KEY = SigningKey.generate("coordinator")
EVAL = [0.91, 0.74, 0.62]


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path)
    yield store
    store.close()


def run_rounds(store: Store, eval_losses: list[float | None]) -> None:
    for r, loss in enumerate(eval_losses, start=1):
        store.open_round(r, f"n{r}", base_version=r - 1, sampled=3)
        for i in range(1, 3 + (r == 3)):  # a third volunteer joins in round 3
            store.record_update(r, volunteer_fp(i), "admitted", examples=40, train_loss=0.3)
        store.close_round(r, "aggregated", eval_loss=loss)


def publish(folder: Path, store: Store, section=SECTION, config: ProjectConfig | None = None) -> str:
    last = len(store.rounds())
    publish_release(folder, store, KEY, section, 1, last, adapter(1), ADAPTER_CONFIG,
                    metrics={"train_loss": 0.3, "dp_epsilon": 2.5}, contributors={volunteer_fp(1): 120},
                    config=config)
    return (folder / "releases" / "v1" / "README.md").read_text()


def test_card_parses_with_huggingface_hub_and_carries_the_federated_evaluation(tmp_path: Path, store: Store):
    run_rounds(store, EVAL)
    section = dataclasses.replace(SECTION, license="apache-2.0")
    config = ProjectConfig(
        project=section, round=RoundSection(min_volunteers=5, volunteers_per_round=5),
        aggregation=AggregationSection(robust="trimmed_mean", trim_fraction=0.2, clip="median"))
    text = publish(tmp_path, store, section, config)
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "peft" and data.base_model == "tiny/llama" and data.license == "apache-2.0"
    assert {"lora", "federated-learning"} <= set(data.tags)
    results = data.eval_results
    assert results is not None and len(results) == 1
    assert results[0].metric_type == "loss" and results[0].metric_value == pytest.approx(EVAL[-1])
    assert results[0].task_type == "text-generation" and "held-out" in results[0].dataset_name
    body = card.text
    for needle in ("## How it was trained", "Rounds: 3 run, 3 aggregated", "admitted update so far: 3",
                   "Aggregation mode: `ffa`", "trimmed mean", "median norm", "Differential privacy: off",
                   "| 3 | v2 | 0.62 | 0.3 |", f"--pin {KEY.public.fingerprint}", "PeftModel.from_pretrained"):
        assert needle in body, needle


def test_card_without_federated_evaluation_has_no_model_index(tmp_path: Path, store: Store):
    run_rounds(store, [None, None])
    card = ModelCard(publish(tmp_path, store))
    assert card.data.eval_results is None and card.data.license == "other"
    assert "No federated evaluation was reported" in card.text
    assert "| train_loss | 0.3 |" in card.text  # the plain table of the release metrics


def test_card_front_matter_survives_a_hostile_project_name(tmp_path: Path, store: Store):
    run_rounds(store, [1.0])
    name = 'x: "y" # z\n- w'
    card = ModelCard(publish(tmp_path, store, dataclasses.replace(SECTION, name=name)))
    assert card.data.model_name == f"{name} v1" and card.data.library_name == "peft"


def test_card_reads_the_mode_from_the_project_file_beside_it(tmp_path: Path, store: Store):
    (tmp_path / "project.toml").write_text(
        f'[project]\nid = "{SECTION.id}"\n[aggregation]\nmode = "exact"\n')
    run_rounds(store, [0.5])
    text = publish(tmp_path, store)
    assert "Aggregation mode: `exact`" in text and "Differential privacy: off" in text


def test_card_states_the_privacy_spent(tmp_path: Path, store: Store):
    run_rounds(store, [1.0])
    config = ProjectConfig(project=SECTION, privacy=PrivacySection(dp=True, noise_multiplier=1.1))
    text = publish(tmp_path, store, config=config)
    assert "noise multiplier 1.1: (epsilon 2.5 spent, delta 1e-05)" in text
