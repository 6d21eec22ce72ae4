"""A rehearsal's report: what the coordinator's store says a real run would show, per round
and per update, with each virtual volunteer's behaviour beside its rejections and clips.

Read from the rehearsal folder's store after the run (the same rows `coordinator status`
shows), plus the rehearsal's own measurements: wall-clock and coordinator memory per round,
and, with a held-out file, the held-out loss of the initial and the final adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from loracommons.rehearse import RehearsalSettings

FLAGGED = ("clipped", "weight_capped")
"""Reasons of admitted updates that the report lists beside the rejections."""


def build_report(folder: Path, settings: RehearsalSettings, clock: dict[int, dict[str, float]], *,
                 seconds: float, coordinator_peak_rss_mb: float) -> dict[str, Any]:
    from loracommons.coordinator.store import Store

    roster = {r["fingerprint"]: r for r in json.loads((folder / "roster.json").read_text())}
    store = Store(folder)
    try:
        rounds, flagged = [], []
        for row in store.rounds():
            updates = store.round_updates(row.round)
            rounds.append({
                "round": row.round, "status": row.status, "sampled": row.sampled,
                "admitted": row.admitted, "rejected": row.rejected, "train_loss": row.train_loss,
                "eval_loss": row.eval_loss, "bytes": sum(u.nbytes for u in updates),
                **clock.get(row.round, {}), "note": row.note,
            })
            for u in updates:
                if u.outcome == "rejected" or u.reason in FLAGGED:
                    who = roster.get(u.fingerprint or "", {})
                    flagged.append({"round": u.round, "partition": who.get("partition"),
                                    "behaviour": who.get("behaviour", "unknown"), "outcome": u.outcome,
                                    "reason": u.reason, "message": u.message})
        releases = [r.version for r in store.releases()]
        final = store.last_aggregated_round()
        final_digest = final.adapter_digest if final else None
    finally:
        store.close()
    behaviours: dict[str, int] = {}
    for r in roster.values():
        behaviours[r["behaviour"]] = behaviours.get(r["behaviour"], 0) + 1
    report: dict[str, Any] = {
        "folder": str(folder), "volunteers": settings.volunteers, "behaviours": behaviours,
        "split": settings.split.kind + (f":{settings.split.field}" if settings.split.field else "")
        + (f" alpha={settings.split.alpha}" if settings.split.alpha else ""),
        "rounds": rounds, "flagged": flagged, "releases": releases, "seconds": round(seconds, 2),
        "coordinator_peak_rss_mb": round(coordinator_peak_rss_mb, 1),
    }
    if settings.heldout is not None:
        report["heldout"] = heldout_losses(folder, settings.heldout, final_digest)
    return report


def heldout_losses(folder: Path, heldout: Path, final_digest: str | None) -> dict[str, float | None]:
    """Held-out loss (per labelled token) of the initial adapter and of the last aggregated one."""
    from loracommons.client.data import load_records
    from loracommons.client.evaluate import heldout_loss
    from loracommons.client.model import apply_adapter, load_base
    from loracommons.coordinator.config import load_config
    from loracommons.coordinator.initial import decode_adapter, initial_adapter
    from loracommons.coordinator.store import Store

    cfg = load_config(folder)
    records = load_records(heldout)
    base, tokenizer = load_base(cfg.project.base_model, cfg.project.base_model_revision or None)
    store = Store(folder)
    try:
        adapters = {"initial": initial_adapter(folder, cfg, store),
                    "final": store.blobs.get(final_digest) if final_digest else None}
    finally:
        store.close()
    out: dict[str, float | None] = {}
    for name, data in adapters.items():
        if data is None:
            out[name] = None
            continue
        model = apply_adapter(base, cfg.lora, decode_adapter(data), cfg.aggregation.mode)
        out[name] = round(heldout_loss(model, tokenizer, records, cfg.train.seq_len), 4)
    return out


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def round_table(report: dict[str, Any]) -> Table:
    """The short table printed at the end of a rehearsal."""
    table = Table(title=f"rehearsal: {report['volunteers']} virtual volunteers, {report['split']}")
    for column in ("round", "status", "admitted", "rejected", "train loss", "eval loss", "MB in",
                   "seconds", "coord. MB"):
        table.add_column(column, justify="right")
    for r in report["rounds"]:
        table.add_row(str(r["round"]), r["status"], str(r["admitted"]), str(r["rejected"]),
                      _num(r["train_loss"]), _num(r["eval_loss"]), f"{r['bytes'] / 2**20:.2f}",
                      _num(r.get("seconds"), 3), _num(r.get("coordinator_rss_mb"), 4))
    return table


def flagged_lines(report: dict[str, Any]) -> list[str]:
    """One line per rejected or neutralized update, grouped as (behaviour, reason) counts."""
    counts: dict[tuple[str, str, str], int] = {}
    for f in report["flagged"]:
        key = (f["behaviour"], f["outcome"], f["reason"])
        counts[key] = counts.get(key, 0) + 1
    return [f"{n} x {behaviour} volunteer: {outcome} ({reason})"
            for (behaviour, outcome, reason), n in sorted(counts.items())]
