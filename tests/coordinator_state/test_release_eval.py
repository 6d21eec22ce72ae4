"""Issue 16: each version's federated eval loss goes into the signed release metrics and the card.

A round scores the adapter it started from, so release vN carries the figures of the versions
scored so far (v0 ... vN-1); the tests drive the real `publishing.publish` on a real store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from loracommons.coordinator import publishing
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.releases import read_release
from loracommons.coordinator.store import Store
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import verify_release

from . import SECTION, adapter, volunteer_fp

KEY = SigningKey.generate("coordinator")
EVAL = [2.4, 1.9, 1.5, 1.2]


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path)
    yield store
    store.close()


def config(publish_every: int) -> ProjectConfig:
    return ProjectConfig.from_dict({
        "project": {"id": SECTION.id, "name": SECTION.name, "base_model": SECTION.base_model},
        "round": {"publish_every": publish_every},
    })


def run(folder: Path, store: Store, cfg: ProjectConfig, evals: list[float | None]) -> None:
    """Rounds as the loop runs them: each starts from the last aggregated adapter, scores it,
    aggregates a new one, and a release follows whenever one is due."""
    current = store.blobs.put(encode_tensors(adapter(0)))
    for r, loss in enumerate(evals, start=1):
        latest = store.latest_release()
        store.open_round(r, f"n{r}", base_version=latest.version if latest else 0, sampled=2,
                         base_adapter_digest=current)
        for i in (1, 2):
            store.record_update(r, volunteer_fp(i), "admitted", examples=40, train_loss=0.5,
                                update_digest=f"{r:02x}{i:062x}")
        current = store.blobs.put(encode_tensors(adapter(r)))
        store.close_round(r, "aggregated", eval_loss=loss, adapter_digest=current, train_loss=0.5)
        if publishing.due(cfg, store, final=r == len(evals)):
            publishing.publish(folder, cfg, store, KEY)


def release(folder: Path, version: int) -> tuple[dict, str]:
    """The signed metrics (as `release.json` holds them) and the card of release `version`."""
    metrics = verify_release(read_release(folder, version), KEY.public).metrics
    return metrics, (folder / "releases" / f"v{version}" / "README.md").read_text()


def test_each_release_carries_every_version_scored_so_far(tmp_path: Path, store: Store):
    run(tmp_path, store, config(1), EVAL[:3])
    for version in (1, 2, 3):
        metrics, _ = release(tmp_path, version)
        # release vN is published after round N, which scored v(N-1): v0 ... v(N-1) are known
        assert metrics["eval_by_version"] == [{"version": v, "round": v + 1, "eval_loss": EVAL[v]}
                                              for v in range(version)]
        assert metrics["eval_loss"] == EVAL[version - 1] and metrics["eval_version"] == version - 1
    assert [e.eval_loss for e in publishing.version_evals(store.rounds(), store.releases())] == EVAL[:3]


def test_the_card_shows_the_curve_per_version_and_parses_on_the_hub(tmp_path: Path, store: Store):
    run(tmp_path, store, config(1), EVAL[:3])
    _, text = release(tmp_path, 3)
    card = ModelCard(text)
    results = card.data.eval_results
    assert results is not None and results[0].metric_value == pytest.approx(EVAL[2])
    assert results[0].metric_name == "held-out loss of v2 (scored in round 3)"
    for row in ("| v0 | 1 | 2.4 |", "| v1 | 2 | 1.9 |", "| v2 | 3 | 1.5 |"):
        assert row in card.text, row
    assert "v3 itself is scored by the volunteers of the next round" in card.text
    assert "eval_by_version |" not in card.text  # a list: its own table, not a cell of the metrics table
    assert "| eval_loss | 1.5 |" in card.text


def test_rounds_from_unreleased_adapters_score_no_version(tmp_path: Path, store: Store):
    """With a release every 2 rounds, rounds 2 and 4 start from adapters that were never released."""
    run(tmp_path, store, config(2), EVAL)
    assert [r.version for r in store.releases()] == [1, 2]
    metrics, _ = release(tmp_path, 2)
    assert metrics["eval_by_version"] == [{"version": 0, "round": 1, "eval_loss": EVAL[0]},
                                          {"version": 1, "round": 3, "eval_loss": EVAL[2]}]


def test_no_evaluation_no_eval_metrics(tmp_path: Path, store: Store):
    run(tmp_path, store, config(1), [None, None])
    metrics, text = release(tmp_path, 2)
    assert not {"eval_loss", "eval_version", "eval_by_version"} & set(metrics)
    assert ModelCard(text).data.eval_results is None
