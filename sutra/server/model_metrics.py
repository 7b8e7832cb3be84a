"""The model pool's metrics: each model's state, loads (from disk or the host cache), load time,
evictions, how long requests waited for their model, and the memory the pool and its cache hold.

A PoolObserver (sutra/server/model_pool.py) sharing the server's registry; the memory gauges are read
at each scrape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sutra.server.served_model import ModelState

if TYPE_CHECKING:
    from sutra.server.model_pool import ModelPool

_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "sutra:model_state",
            "1 for the state each model is in (cold, cached, loading, ready, evicting), 0 for the others.",
            ["model_name", "state"],
            registry=registry,
        )
        self.loads = Counter(
            "sutra:model_loads",
            "Model loads, by where the weights came from (disk: the source; cache: host memory).",
            ["model_name", "source"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "sutra:model_load_seconds",
            "Time to load a model until its engine serves.",
            ["model_name", "source"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.evictions = Counter(
            "sutra:model_evictions", "Models evicted to make room.", ["model_name"], registry=registry
        )
        self.wait_seconds = Histogram(
            "sutra:model_wait_seconds",
            "Time requests waited for their model (its load, or room for it), of requests that waited.",
            ["model_name"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.memory = Gauge(
            "sutra:model_memory_bytes",
            "Memory a model holds while loading, ready or evicting (weights + KV cache), else 0.",
            ["model_name"],
            registry=registry,
        )
        self.memory_budget = Gauge(
            "sutra:model_memory_budget_bytes",
            "--model-memory-gb in bytes (0: no limit).",
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "sutra:model_cache_bytes", "Weights of evicted models held in host memory.", registry=registry
        )
        self.cache_capacity = Gauge(
            "sutra:model_cache_capacity_bytes", "--model-cache-gb in bytes (0: no cache).", registry=registry
        )

    # ---- PoolObserver ----------------------------------------------------------------------
    def on_state(self, name: str, state: ModelState) -> None:
        for each in ModelState:
            self.state.labels(name, each.value).set(1 if each is state else 0)

    def on_load(self, name: str, source: str, seconds: float) -> None:
        self.loads.labels(name, source).inc()
        self.load_seconds.labels(name, source).observe(seconds)

    def on_evict(self, name: str) -> None:
        self.evictions.labels(name).inc()

    def on_wait(self, name: str, seconds: float) -> None:
        self.wait_seconds.labels(name).observe(seconds)

    # ---- at each scrape --------------------------------------------------------------------
    def observe_pool(self, pool: ModelPool) -> None:
        for name, model in pool.models.items():
            resident = model.state in (ModelState.LOADING, ModelState.READY, ModelState.EVICTING)
            self.memory.labels(name).set(model.footprint if resident else 0)
        if pool.memory_budget is not None:
            self.memory_budget.set(pool.memory_budget)
        if pool.cache is not None:
            self.cache_bytes.set(pool.cache.used_bytes)
            self.cache_capacity.set(pool.cache.capacity_bytes)
