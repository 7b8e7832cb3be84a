"""Prometheus metrics of a serving engine, updated by the engine loop after every step.

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `sutra:time_to_first_token_seconds`) so
existing dashboards need only the prefix changed. Each server gets its own registry. The per-client
families are labelled through ClientSeries, so no client name can break a scrape or grow the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from sutra.core.stats import EngineStats
from sutra.engine.client import EngineClient, RequestDelta
from sutra.server.client_series import DEFAULT_IDLE_S, DEFAULT_MAX_SERIES, ClientSeries
from sutra.server.cluster_metrics import ClusterMetrics
from sutra.server.model_metrics import ModelMetrics

# `*_created` timestamps double the output and no dashboard reads them (vLLM turns them off too).
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass
class _Progress:
    num_tokens: int = 0
    first_token_time: float = 0.0
    last_token_time: float = 0.0


@dataclass(frozen=True)
class ServingSlo:
    """DistServe's per-request SLOs: a request attains when both hold (None: not checked)."""

    ttft_s: float | None = None  # time to first token
    tpot_s: float | None = None  # mean time per output token after the first

    def attained(self, ttft_s: float | None, tpot_s: float) -> bool:
        if self.ttft_s is not None and (ttft_s is None or ttft_s > self.ttft_s):
            return False
        return self.tpot_s is None or tpot_s <= self.tpot_s


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        max_client_series: int = DEFAULT_MAX_SERIES,
        client_idle_s: float = DEFAULT_IDLE_S,
        slo: ServingSlo | None = None,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        self.slo = slo
        labels = ["model_name"]
        self.clients = ClientSeries(max_client_series, client_idle_s, on_drop=self._drop_client)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.ttft = histogram(
            "sutra:time_to_first_token_seconds", "Time from arrival to the first token.", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "sutra:inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "sutra:e2e_request_latency_seconds", "Time from arrival to the last token.", _REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "sutra:request_queue_time_seconds", "Time from arrival to first scheduling.", _REQUEST_BUCKETS
        )
        self.prompt_tokens = Counter(
            "sutra:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "sutra:generation_tokens", "Generated tokens.", labels, registry=registry
        )
        self.preemptions = Counter(
            "sutra:num_preemptions", "Requests preempted (recomputed later).", labels, registry=registry
        )
        self.finished = Counter(
            "sutra:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.running = Gauge("sutra:num_requests_running", "Requests running.", labels, registry=registry)
        self.waiting = Gauge("sutra:num_requests_waiting", "Requests waiting.", labels, registry=registry)
        self.kv_usage = Gauge(
            "sutra:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", labels, registry=registry
        )
        self.kv_free_blocks = Gauge(
            "sutra:kv_cache_free_blocks", "KV blocks not held by any request.", labels, registry=registry
        )
        self.kv_total_blocks = Gauge(
            "sutra:kv_cache_total_blocks", "KV blocks in the pool.", labels, registry=registry
        )
        self.prefix_hit_rate = Gauge(
            "sutra:prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start.",
            labels,
            registry=registry,
        )
        client_labels = [*labels, "client"]
        self.client_tokens = Counter(
            "sutra:client_generation_tokens", "Generated tokens per client.", client_labels, registry=registry
        )
        self.client_prompt_tokens = Counter(
            "sutra:client_prompt_tokens", "Prompt tokens per client.", client_labels, registry=registry
        )
        self.client_queue_time = Histogram(
            "sutra:client_request_queue_time_seconds",
            "Time from arrival to first scheduling, per client.",
            client_labels,
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.estimate_error = histogram(
            "sutra:completion_estimate_error_seconds",
            "|actual - estimated| time from admission to finish, for finished requests.",
            _REQUEST_BUCKETS,
        )
        self.estimate_relative_error = histogram(
            "sutra:completion_estimate_relative_error",
            "|actual - estimated| / actual time from admission to finish.",
            (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
        )
        self.slo_requests = Counter(
            "sutra:slo_requests",
            "Finished requests by whether they met the serving SLOs (--slo-ttft-ms, --slo-tpot-ms): "
            "attainment is attained / all. Present only when an SLO is set.",
            [*labels, "outcome"],
            registry=registry,
        )
        self.cluster: ClusterMetrics | None = None  # per-instance families, when serving a cluster
        self.models = ModelMetrics(registry)  # the model pool's: states, loads, evictions, memory
        self._progress: dict[str, _Progress] = {}  # by request id, unique across models
        self._series: dict[str, ModelSeries] = {}
        self._default = self.for_model(model_name)

    def for_model(self, model_name: str) -> ModelSeries:
        """The listener that labels a model's engine's series with its name."""
        series = self._series.get(model_name)
        if series is None:
            series = self._series[model_name] = ModelSeries(self, model_name)
            if self.slo is not None:
                for outcome in ("attained", "missed"):
                    self.slo_requests.labels(model_name, outcome)
        return series

    # ---- EngineListener of the first model (a server of one engine attaches the metrics itself) ----
    def on_step(self, engine: EngineClient, deltas: list[RequestDelta]) -> None:
        self._default.on_step(engine, deltas)

    def on_abort(self, engine: EngineClient, request_id: str) -> None:
        self._default.on_abort(engine, request_id)

    def observe_state(self, stats: EngineStats) -> None:
        self._default.observe_state(stats)

    def _drop_client(self, client: str) -> None:
        for family in (self.client_tokens, self.client_prompt_tokens, self.client_queue_time):
            for model_name in self._series:
                try:
                    family.remove(model_name, client)
                except KeyError:  # this family never saw the client with this model
                    pass

    def enable_cluster(self) -> ClusterMetrics:
        if self.cluster is None:
            self.cluster = ClusterMetrics(self.registry, self._default.model_name)
        return self.cluster

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelSeries:
    """The engine-fed series of one model: an EngineListener of that model's engine."""

    def __init__(self, metrics: ServerMetrics, model_name: str) -> None:
        self.metrics = metrics
        self.model_name = model_name
        self._labels = {"model_name": model_name}
        self._seen_preemptions = 0

    def on_step(self, engine: EngineClient, deltas: list[RequestDelta]) -> None:
        lab = self._labels
        for delta in deltas:
            rid, m = delta.request_id, delta.metrics
            info = engine.request_info(rid)
            client = self.metrics.clients.label(None if info is None else info.client)
            progress = self.metrics._progress.get(rid)
            if progress is None:
                progress = self.metrics._progress[rid] = _Progress()
                if m.queue_time is not None:
                    self.metrics.queue_time.labels(**lab).observe(m.queue_time)
                    self.metrics.client_queue_time.labels(**lab, client=client).observe(m.queue_time)
                self.metrics.client_prompt_tokens.labels(**lab, client=client).inc(delta.num_prompt_tokens)
            new_tokens = sum(len(c.token_ids) for c in delta.completions)
            num_tokens = progress.num_tokens + new_tokens
            if new_tokens > 0 and m.last_token_time is not None:
                if progress.num_tokens == 0:
                    progress.first_token_time = m.last_token_time
                    if m.time_to_first_token is not None:
                        self.metrics.ttft.labels(**lab).observe(m.time_to_first_token)
                else:
                    self.metrics.itl.labels(**lab).observe(m.last_token_time - progress.last_token_time)
                progress.num_tokens, progress.last_token_time = num_tokens, m.last_token_time
                self.metrics.generation_tokens.labels(**lab).inc(new_tokens)
                self.metrics.client_tokens.labels(**lab, client=client).inc(new_tokens)
            if delta.finished:
                del self.metrics._progress[rid]
                self.metrics.prompt_tokens.labels(**lab).inc(delta.num_prompt_tokens)
                if m.finished_time is not None:
                    self.metrics.e2e.labels(**lab).observe(m.finished_time - m.arrival_time)
                    self._observe_estimate(engine.estimate_of(rid), m.finished_time)
                for c in delta.completions:
                    self.metrics.finished.labels(**lab, finished_reason=c.finish_reason or "abort").inc()
                if self.metrics.slo is not None:
                    self._observe_slo(m.time_to_first_token, progress, len(delta.completions))
        self.observe_state(engine.stats())

    def _observe_slo(self, ttft_s: float | None, progress: _Progress, num_completions: int) -> None:
        assert self.metrics.slo is not None
        per_completion = progress.num_tokens / max(1, num_completions)
        tpot = (progress.last_token_time - progress.first_token_time) / max(1.0, per_completion - 1)
        outcome = "attained" if self.metrics.slo.attained(ttft_s, tpot) else "missed"
        self.metrics.slo_requests.labels(**self._labels, outcome=outcome).inc()

    def _observe_estimate(self, estimate: tuple[float, float] | None, finished_time: float) -> None:
        if estimate is None:
            return
        estimated, made_at = estimate
        actual = finished_time - made_at
        error = abs(actual - estimated)
        self.metrics.estimate_error.labels(**self._labels).observe(error)
        if actual > 0:
            self.metrics.estimate_relative_error.labels(**self._labels).observe(error / actual)

    def on_abort(self, engine: EngineClient, request_id: str) -> None:
        self.metrics._progress.pop(request_id, None)
        self.metrics.finished.labels(**self._labels, finished_reason="abort").inc()

    def engine_gone(self) -> None:
        """The model's engine was evicted: nothing runs or waits, and it holds no KV cache. (A new
        engine counts preemptions from 0 again.)"""
        self._seen_preemptions = 0
        for gauge in (self.metrics.running, self.metrics.waiting, self.metrics.kv_usage):
            gauge.labels(**self._labels).set(0)
        for gauge in (self.metrics.kv_free_blocks, self.metrics.kv_total_blocks):
            gauge.labels(**self._labels).set(0)

    def observe_state(self, stats: EngineStats) -> None:
        self.metrics.clients.expire()
        lab = self._labels
        self.metrics.preemptions.labels(**lab).inc(max(0, stats.num_preemptions - self._seen_preemptions))
        self._seen_preemptions = stats.num_preemptions
        self.metrics.running.labels(**lab).set(stats.num_running)
        self.metrics.waiting.labels(**lab).set(stats.num_waiting)
        self.metrics.kv_usage.labels(**lab).set(stats.kv_usage)
        self.metrics.kv_free_blocks.labels(**lab).set(stats.kv_free_blocks)
        self.metrics.kv_total_blocks.labels(**lab).set(stats.kv_total_blocks)
        if stats.prefix_hit_rate is not None:
            self.metrics.prefix_hit_rate.labels(**lab).set(stats.prefix_hit_rate)
