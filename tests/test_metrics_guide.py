"""docs/operations.md's metrics table is the registry's: every series service/metrics.py
exposes (the pool's gauges, read from a real pool, included), with its type and labels, and
nothing else. A metric or label added, removed or renamed without the guide fails here."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import Metrics

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The table under "## Metrics": series → (type, labels)."""
    section = GUIDE.read_text().split("\n## Metrics\n")[1].split("\n## ")[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    return {
        name.strip(" `"): (kind.strip(), frozenset(re.findall(r"`([a-z_]+)`", labels))) for name, kind, labels in rows
    }


def exposed(metrics: Metrics) -> dict[str, tuple[str, frozenset[str]]]:
    """Every series the registry exposes, by the name a scrape shows (counters with _total)."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for collector in list(metrics.registry._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            # A labelled family without children yet has no samples to read labels from.
            name, kind, labels = str(collector._name), str(collector._type), collector._labelnames
            found[f"{name}_total" if kind == "counter" else name] = (kind, frozenset(labels))
        else:
            for family in collector.collect():
                labels = {label for sample in family.samples for label in sample.labels}
                found[family.name] = (family.type, frozenset(labels))
    return found


async def test_the_operations_guide_lists_every_metric_with_its_type_and_labels(pool: asyncpg.Pool) -> None:
    metrics = Metrics()
    metrics.watch_pool(pool)
    registry, guide = exposed(metrics), documented()
    assert {n for n, (kind, _) in registry.items() if kind == "gauge" and n.startswith("invoice_db_pool")}, registry
    assert set(guide) == set(registry), (
        f"only in the guide: {set(guide) - set(registry)}; only in the registry: " + str(set(registry) - set(guide))
    )
    assert {n: guide[n] for n in registry} == registry
