"""Releases from aggregated rounds, and the central-DP budget those rounds spend.

The round loop asks `due` after every aggregated round (and once more, `final`, when it
stops) and calls `publish`; resume does the same, so an aggregated round whose release a
crash left unwritten is published, never twice. Every aggregated round counts as one DP
release whether or not it was published on its own (`publish_every` > 1 batches them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracommons.coordinator import privacy
from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.initial import decode_adapter
from loracommons.coordinator.releases import publish_release
from loracommons.coordinator.rows import ReleaseRow, RoundRow
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.lora import peft_adapter_config


def _dp_rounds(store: Store) -> int:
    return sum(row.status == "aggregated" for row in store.rounds())


def privacy_metrics(cfg: ProjectConfig, store: Store, extra_rounds: int = 0) -> dict[str, float]:
    """Epsilon spent so far under central DP (every aggregated round is a DP release)."""
    dp = cfg.privacy
    if not dp.dp:
        return {}
    spent = privacy.epsilon(_dp_rounds(store) + extra_rounds, dp.noise_multiplier, dp.delta)
    return {"dp_epsilon": round(spent, 4), "dp_delta": dp.delta, "dp_noise_multiplier": dp.noise_multiplier}


def budget_left(cfg: ProjectConfig, store: Store) -> bool:
    """False when one more DP round would spend more than `[privacy] max_epsilon`."""
    dp = cfg.privacy
    if not dp.dp or dp.max_epsilon <= 0:
        return True
    return privacy.epsilon(_dp_rounds(store) + 1, dp.noise_multiplier, dp.delta) <= dp.max_epsilon


@dataclass(frozen=True)
class VersionEval:
    """The federated evaluation of one version: the robust median of the held-out losses the
    volunteers of `round` (the first round that started from that version) signed for it."""

    version: int  # 0: the initial adapter
    round: int
    eval_loss: float


def version_evals(rounds: list[RoundRow], releases: list[ReleaseRow]) -> list[VersionEval]:
    """Each version's federated eval loss, oldest first; versions no round has scored are left out.

    A round scores the adapter it started from; that adapter is version v exactly when it is the one
    release v's round produced (with `publish_every` > 1 rounds also start from unreleased adapters,
    which are no version). Version 0 is the initial adapter, the one the first round started from.
    """
    produced = {row.round: row.adapter_digest for row in rounds if row.adapter_digest}
    digests = {produced[r.round]: r.version for r in releases if r.round in produced}
    if rounds and rounds[0].base_version == 0 and rounds[0].base_adapter_digest:
        digests.setdefault(rounds[0].base_adapter_digest, 0)
    found: dict[int, VersionEval] = {}
    for row in rounds:
        version = digests.get(row.base_adapter_digest or "")
        if version is not None and row.eval_loss is not None and version not in found:
            found[version] = VersionEval(version, row.round, row.eval_loss)
    return [found[v] for v in sorted(found)]


def eval_metrics(store: Store, through_round: int) -> dict[str, Any]:
    """The release metrics of the federated evaluation: every version scored by `through_round`
    (`eval_by_version`) and the latest of them (`eval_loss` of `eval_version`). A release is
    published before any round has started from it, so its own figure comes with the next release."""
    rounds = [row for row in store.rounds() if row.round <= through_round]
    evals = version_evals(rounds, store.releases())
    if not evals:
        return {}
    last = evals[-1]
    return {"eval_loss": last.eval_loss, "eval_version": last.version,
            "eval_by_version": [{"version": e.version, "round": e.round, "eval_loss": e.eval_loss}
                                for e in evals]}


def unreleased_rounds(store: Store) -> list[RoundRow]:
    latest = store.latest_release()
    since = latest.round if latest else 0
    return [row for row in store.rounds() if row.status == "aggregated" and row.round > since]


def due(cfg: ProjectConfig, store: Store, final: bool) -> bool:
    """Whether a release is due: `publish_every` rounds wait unreleased, or any at the end."""
    pending = unreleased_rounds(store)
    return bool(pending) and (final or len(pending) >= cfg.round.publish_every)


def publish(project_dir: Path, cfg: ProjectConfig, store: Store, key: SigningKey) -> tuple[int, int]:
    """Publish the latest aggregated adapter as the next signed release; returns (version, round)."""
    pending = unreleased_rounds(store)
    last = pending[-1]
    assert last.adapter_digest is not None  # an aggregated round has its adapter
    data = store.blobs.get(last.adapter_digest)
    digests: list[str] = []
    contributors: dict[str, int] = {}
    for row in pending:
        for update in store.round_updates(row.round):
            if update.outcome == "admitted" and update.update_digest and update.fingerprint:
                digests.append(update.update_digest)
                fp = update.fingerprint
                contributors[fp] = contributors.get(fp, 0) + int(update.examples or 0)
    latest = store.latest_release()
    version = (latest.version if latest else 0) + 1
    # train_loss is the round's median claim (round.robust_loss), so no one volunteer sets it.
    # eval_loss likewise (eval_metrics): the median of the volunteers' scores of each version.
    metrics: dict[str, Any] = {
        "round": last.round, "train_loss": last.train_loss, "admitted": last.admitted,
        "rejected": last.rejected, "rounds_aggregated": len(pending),
        **eval_metrics(store, last.round), **privacy_metrics(cfg, store)}
    project = cfg.project
    publish_release(
        project_dir, store, key, project, version, last.round, decode_adapter(data),
        peft_adapter_config(cfg.lora, project.base_model, project.base_model_revision),
        metrics=metrics, update_digests=digests, contributors=contributors, config=cfg,
    )
    return version, last.round
