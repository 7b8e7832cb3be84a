"""Prometheus metrics of a server in front of many engine instances: each instance's state under an
`instance` label, the migrations between them (by outcome, with their downtime and bytes), and in
disaggregated serving the requests per role and the hand-offs (by outcome, wait and transfer time).

The cluster's totals stay in ServerMetrics' unlabelled families, so dashboards made for one engine
keep working; these families add the per-instance view. An instance that goes away loses its series.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sutra.core.stats import EngineStats, InstanceLoad

_DOWNTIME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
MIGRATION_OUTCOMES = ("migrated", "aborted", "failed")


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self._model = model_name
        labels = ["model_name", "instance"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.running = gauge("sutra:instance_num_requests_running", "Requests running, per instance.")
        self.waiting = gauge("sutra:instance_num_requests_waiting", "Requests waiting, per instance.")
        self.kv_free_blocks = gauge(
            "sutra:instance_kv_cache_free_blocks", "KV blocks not held, per instance."
        )
        self.kv_total_blocks = gauge("sutra:instance_kv_cache_total_blocks", "KV blocks, per instance.")
        self.parked = gauge(
            "sutra:instance_num_requests_parked",
            "Requests a prefill instance holds after their first token until a decode instance pulls "
            "them (disaggregated serving), per instance.",
        )
        self.role_requests = Gauge(
            "sutra:role_num_requests",
            "Requests per instance role (mixed, prefill, decode) and state (waiting, running, parked).",
            ["model_name", "role", "state"],
            registry=registry,
        )
        self.handoff_queue = Gauge(
            "sutra:handoff_queue_length",
            "Parked requests the front end has yet to give to a decode instance.",
            ["model_name"],
            registry=registry,
        )
        self.handoffs = Counter(
            "sutra:handoffs",
            "Pulls of parked requests by decode instances, by outcome.",
            ["model_name", "outcome"],
            registry=registry,
        )
        self.handoff_wait = Histogram(
            "sutra:handoff_wait_seconds",
            "Time a request waited parked on its prefill instance before the pull that took it.",
            ["model_name"],
            buckets=_DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.handoff_transfer = Histogram(
            "sutra:handoff_transfer_seconds",
            "Time a pull took: the request's KV and state from the prefill to the decode instance.",
            ["model_name"],
            buckets=_DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.freeness = gauge(
            "sutra:instance_freeness",
            "Llumnix freeness: KV blocks free after the instance's commitments, per running request.",
        )
        self.migrations = Counter(
            "sutra:migrations",
            "Live migrations of requests, by outcome.",
            ["model_name", "outcome"],
            registry=registry,
        )
        self.migration_downtime = Histogram(
            "sutra:migration_downtime_seconds",
            "Time a migrated request was paused: from the pause on its source to its adoption.",
            ["model_name"],
            buckets=_DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.migration_bytes = Counter(
            "sutra:migration_bytes", "KV bytes copied by live migrations.", ["model_name"], registry=registry
        )
        for outcome in MIGRATION_OUTCOMES:  # present from the start, at 0
            self.migrations.labels(model_name, outcome)
            self.handoffs.labels(model_name, outcome)
        self._instances: set[str] = set()

    def observe_instances(
        self,
        stats: dict[str, EngineStats],
        loads: dict[str, InstanceLoad],
        roles: Mapping[str, str] | None = None,
        handoff_queue: int = 0,
    ) -> None:
        for gone in self._instances - stats.keys():
            for family in (
                self.running,
                self.waiting,
                self.parked,
                self.kv_free_blocks,
                self.kv_total_blocks,
                self.freeness,
            ):
                try:
                    family.remove(self._model, gone)
                except KeyError:
                    pass
        self._instances = set(stats)
        self.handoff_queue.labels(self._model).set(handoff_queue)
        by_role: dict[tuple[str, str], int] = {}
        for instance, s in stats.items():
            role = (roles or {}).get(instance, "mixed")
            for state, count in (
                ("waiting", s.num_waiting),
                ("running", s.num_running),
                ("parked", s.num_parked),
            ):
                by_role[role, state] = by_role.get((role, state), 0) + count
        for (role, state), count in by_role.items():
            self.role_requests.labels(self._model, role, state).set(count)
        for instance, s in stats.items():
            self.running.labels(self._model, instance).set(s.num_running)
            self.waiting.labels(self._model, instance).set(s.num_waiting)
            self.parked.labels(self._model, instance).set(s.num_parked)
            self.kv_free_blocks.labels(self._model, instance).set(s.kv_free_blocks)
            self.kv_total_blocks.labels(self._model, instance).set(s.kv_total_blocks)
            load = loads.get(instance)
            if load is not None and load.freeness != float("-inf"):
                self.freeness.labels(self._model, instance).set(load.freeness)

    def observe_handoff(self, outcome: str, wait_s: float, transfer_s: float) -> None:
        if outcome not in MIGRATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {MIGRATION_OUTCOMES}, got {outcome!r}")
        self.handoffs.labels(self._model, outcome).inc()
        if outcome == "migrated":
            self.handoff_wait.labels(self._model).observe(wait_s)
            self.handoff_transfer.labels(self._model).observe(transfer_s)

    def observe_migration(self, outcome: str, downtime_s: float = 0.0, bytes_copied: int = 0) -> None:
        if outcome not in MIGRATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {MIGRATION_OUTCOMES}, got {outcome!r}")
        self.migrations.labels(self._model, outcome).inc()
        if bytes_copied:
            self.migration_bytes.labels(self._model).inc(bytes_copied)
        if outcome == "migrated":
            self.migration_downtime.labels(self._model).observe(downtime_s)
