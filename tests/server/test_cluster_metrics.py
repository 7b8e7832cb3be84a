"""Per-instance and migration metrics render, parse, and drop the series of an instance that left."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sutra.core.stats import EngineStats, InstanceLoad
from sutra.server.cluster_metrics import ClusterMetrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stats(running: int, free: int) -> EngineStats:
    return EngineStats(running, 0, 0, 100, free, 0, 0)


def test_instances_are_labelled_and_a_departed_one_loses_its_series():
    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry, "m")
    loads = {"i0": InstanceLoad(100, 40, 2, 0, 0), "i1": InstanceLoad(100, 0, 0, 0, 0, draining=True)}
    metrics.observe_instances({"i0": stats(2, 60), "i1": stats(0, 100)}, loads)
    got = samples(registry)
    assert got[("sutra:instance_num_requests_running", (("instance", "i0"), ("model_name", "m")))] == 2
    assert got[("sutra:instance_freeness", (("instance", "i0"), ("model_name", "m")))] == 30
    assert ("sutra:instance_freeness", (("instance", "i1"), ("model_name", "m"))) not in got  # -inf: draining
    metrics.observe_instances({"i0": stats(1, 80)}, {})
    assert not any(dict(labels).get("instance") == "i1" for _, labels in samples(registry))


def test_migrations_are_counted_by_outcome_with_downtime_and_bytes():
    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry, "m")
    assert samples(registry)[("sutra:migrations_total", (("model_name", "m"), ("outcome", "aborted")))] == 0
    metrics.observe_migration("migrated", downtime_s=0.03, bytes_copied=1000)
    metrics.observe_migration("aborted", bytes_copied=500)
    got = samples(registry)
    assert got[("sutra:migrations_total", (("model_name", "m"), ("outcome", "migrated")))] == 1
    assert got[("sutra:migration_bytes_total", (("model_name", "m"),))] == 1500
    assert got[("sutra:migration_downtime_seconds_count", (("model_name", "m"),))] == 1
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe_migration("lost")


def test_disaggregated_requests_are_counted_per_role_and_hand_offs_by_outcome():
    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry, "m")
    parked = EngineStats(1, 3, 0, 100, 20, 0, 0, num_parked=4)
    decoding = EngineStats(7, 0, 0, 100, 50, 0, 0)
    metrics.observe_instances({"p0": parked, "d0": decoding}, {}, {"p0": "prefill", "d0": "decode"}, 2)
    metrics.observe_handoff("migrated", wait_s=0.3, transfer_s=0.02)
    metrics.observe_handoff("aborted", wait_s=0.0, transfer_s=0.01)
    got = samples(registry)

    def role(r: str, state: str) -> float:
        return got[("sutra:role_num_requests", (("model_name", "m"), ("role", r), ("state", state)))]

    assert (role("prefill", "parked"), role("prefill", "waiting"), role("decode", "running")) == (4, 3, 7)
    assert got[("sutra:instance_num_requests_parked", (("instance", "p0"), ("model_name", "m")))] == 4
    assert got[("sutra:handoff_queue_length", (("model_name", "m"),))] == 2
    assert got[("sutra:handoffs_total", (("model_name", "m"), ("outcome", "migrated")))] == 1
    assert got[("sutra:handoffs_total", (("model_name", "m"), ("outcome", "aborted")))] == 1
    assert got[("sutra:handoff_wait_seconds_count", (("model_name", "m"),))] == 1  # completed pulls only
    assert got[("sutra:handoff_transfer_seconds_sum", (("model_name", "m"),))] == pytest.approx(0.02)
