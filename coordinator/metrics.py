"""The coordinator's Prometheus metrics, read from the store at each scrape.

    registry = metrics_registry(store, project_facts)
    body = generate_latest(registry)        # what GET /metrics answers

A custom collector rather than counters kept in memory: the store is the source of
truth, so the numbers survive a restart and match `coordinator status` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loracommons.coordinator.rows import OUTCOMES
from loracommons.coordinator.store import Store

#: The text format and content type Prometheus has scraped from this API since its start.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ProjectLabels:
    """Project facts exported as the labels of `loracommons_info`."""

    project: str
    base_model: str
    mode: str
    membership: str


class StoreCollector(Collector):
    """Rounds, updates, volunteers, the latest release and the last losses, per scrape."""

    def __init__(self, store: Store, labels: Callable[[], ProjectLabels]):
        self.store = store
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        status = self.store.status()
        last = next((r for r in reversed(self.store.rounds()) if r.status == "aggregated"), None)
        facts = self.labels()
        info = GaugeMetricFamily("loracommons_info", "Project facts as labels.",
                                 labels=["project", "base_model", "mode", "membership"])
        info.add_metric([facts.project, facts.base_model, facts.mode, facts.membership], 1)
        yield info
        rounds = GaugeMetricFamily("loracommons_rounds", "Rounds by status.", labels=["status"])
        for name, count in status.rounds.by_status.items():
            rounds.add_metric([name], count)
        yield rounds
        yield GaugeMetricFamily("loracommons_last_closed_round", "Number of the last closed round.",
                                value=status.rounds.last_closed)
        updates = CounterMetricFamily("loracommons_updates", "Updates received, by admission outcome.",
                                      labels=["outcome"])
        counts = {"admitted": status.updates.admitted, "rejected": status.updates.rejected}
        for outcome in OUTCOMES:
            updates.add_metric([outcome], counts[outcome])
        yield updates
        rejected = CounterMetricFamily("loracommons_updates_rejected", "Rejected updates by reason code.",
                                       labels=["reason"])
        for reason, count in status.updates.rejected_by_reason.items():
            rejected.add_metric([reason], count)
        yield rejected
        volunteers = GaugeMetricFamily("loracommons_volunteers", "Volunteer keys by state.", labels=["state"])
        for state in ("known", "registered", "banned", "contributed"):
            volunteers.add_metric([state], getattr(status.volunteers, state))
        yield volunteers
        latest = status.latest_release.version if status.latest_release else 0
        yield GaugeMetricFamily("loracommons_latest_release_version",
                                "Version of the latest release (0: none).", value=latest)
        yield _loss("loracommons_train_loss", "Example-weighted train loss of the last aggregated round.",
                    last.train_loss if last else None)
        yield _loss("loracommons_eval_loss", "Eval loss of the last aggregated round.",
                    last.eval_loss if last else None)


def _loss(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)


def metrics_registry(store: Store, labels: Callable[[], ProjectLabels]) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) holding only this store's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, labels))
    return registry
