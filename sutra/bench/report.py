"""Serving metrics from per-request records, computed and printed the way `vllm bench serve` does.

- Only successful requests count toward tokens, throughputs and latencies; failed ones are counted apart.
- TTFT: send -> first text chunk. E2EL: send -> last text chunk. ITL: the gaps between text chunks, pooled
  over all requests. TPOT per request: (E2EL - TTFT) / (output tokens - 1), so the first token is
  excluded; requests with one output token have no TPOT (and count as TPOT 0 for goodput).
- Goodput: successful requests per second that meet every given SLO (TTFT, TPOT, E2EL in ms).
- Throughputs divide by the run's duration (start of the arrival schedule to the last completion). Peak output throughput is
  the busiest whole second of output tokens (each text chunk weighted by output tokens / text chunks of
  its request), counted in 1-second buckets from the first send, as vLLM does. Peak concurrent requests
  is the most requests in flight at one instant (vLLM counts requests active during the same second,
  which for short requests exceeds the concurrency limit).
- Percentiles interpolate linearly (numpy's default); with no samples every statistic is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sutra.bench.client import RequestOutput

MS_PER_S = 1000.0
METRIC_LABELS = {  # name -> (short name, section header)
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
LABEL_WIDTH = 40
BLOCK_WIDTH = 50


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[float, float]

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        values = np.asarray(seconds, dtype=float) * MS_PER_S if len(seconds) else np.zeros(1)
        return cls(
            mean_ms=float(np.mean(values)),
            median_ms=float(np.median(values)),
            std_ms=float(np.std(values)),
            percentiles_ms={float(p): float(np.percentile(values, p)) for p in percentiles},
        )


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # successful requests / s
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float  # tokens / s
    peak_output_throughput: float  # tokens in the busiest 1-second bucket
    peak_concurrent_requests: int
    total_token_throughput: float  # (input + output tokens) / s
    latencies: dict[str, LatencyStats]  # ttft, tpot, itl, e2el
    output_tokens_per_second: list[float]  # 1-second buckets from the first send


def request_tpot(output: RequestOutput) -> float | None:
    """Mean time per output token after the first; None for a single-token output."""
    if output.output_tokens <= 1:
        return None
    return (output.latency - output.ttft) / (output.output_tokens - 1)


def meets_slos(output: RequestOutput, slos_ms: Mapping[str, float]) -> bool:
    measured = {
        "ttft": output.ttft,
        "tpot": request_tpot(output) or 0.0,
        "e2el": output.latency,
    }
    return all(measured[name] * MS_PER_S <= slo for name, slo in slos_ms.items())


def output_tokens_per_second(outputs: Sequence[RequestOutput]) -> list[float]:
    """Output tokens in each 1-second bucket from the earliest successful send."""
    done = [o for o in outputs if o.success]
    if not done:
        return []
    origin = min(o.start_time for o in done)
    buckets = int(math.ceil(max(o.start_time + o.latency for o in done) - origin)) + 1
    tokens = np.zeros(buckets)
    for o in done:
        weight = o.output_tokens / len(o.chunk_times) if o.chunk_times else 0.0
        for t in o.chunk_times:
            tokens[min(int(t - origin), buckets - 1)] += weight
    return [float(x) for x in tokens]


def requests_in_flight(outputs: Sequence[RequestOutput]) -> tuple[list[float], list[int]]:
    """(times, counts): successful requests in flight from each time on (sent, last chunk not yet in).

    Times are seconds from the earliest send; the count after the last time is 0.
    """
    done = [o for o in outputs if o.success]
    if not done:
        return [], []
    origin = min(o.start_time for o in done)
    # At equal times, ends sort before starts: back-to-back requests never count as overlapping.
    events = sorted(
        [(o.start_time - origin, 1) for o in done] + [(o.start_time + o.latency - origin, -1) for o in done]
    )
    times, counts, current = [], [], 0
    for t, change in events:
        current += change
        times.append(t)
        counts.append(current)
    return times, counts


def compute_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    goodput_slos_ms: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = (99.0,),
) -> BenchMetrics:
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    tpots = [t for t in (request_tpot(o) for o in done) if t is not None]
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": tpots,
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    goodput = None
    if goodput_slos_ms:
        goodput = sum(meets_slos(o, goodput_slos_ms) for o in done) / duration_s
    tokens_per_s = output_tokens_per_second(outputs)
    return BenchMetrics(
        completed=len(done),
        failed=len(outputs) - len(done),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(done) / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        peak_output_throughput=max(tokens_per_s, default=0.0),
        peak_concurrent_requests=max(requests_in_flight(outputs)[1], default=0),
        total_token_throughput=(total_input + total_output) / duration_s,
        latencies={name: LatencyStats.of(values, percentiles) for name, values in samples.items()},
        output_tokens_per_second=tokens_per_s,
    )


def _line(label: str, value: float | int | str, decimals: int = 2) -> str:
    text = f"{value:.{decimals}f}" if isinstance(value, float) else str(value)
    return f"{label:<{LABEL_WIDTH}} {text}"


def percentile_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else f"{p:g}"


def format_report(
    metrics: BenchMetrics,
    *,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
) -> str:
    """The result block, laid out as `vllm bench serve` prints it."""
    lines = [
        f"{' Serving Benchmark Result ':=^{BLOCK_WIDTH}}",  # format centring, as vLLM (not str.center)
        _line("Successful requests:", metrics.completed),
        _line("Failed requests:", metrics.failed),
    ]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_line("Request rate configured (RPS):", float(request_rate)))
    lines += [
        _line("Benchmark duration (s):", metrics.duration_s),
        _line("Total input tokens:", metrics.total_input_tokens),
        _line("Total generated tokens:", metrics.total_output_tokens),
        _line("Request throughput (req/s):", metrics.request_throughput),
    ]
    if metrics.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", metrics.request_goodput))
    lines += [
        _line("Output token throughput (tok/s):", metrics.output_throughput),
        _line("Peak output token throughput (tok/s):", metrics.peak_output_throughput),
        _line("Peak concurrent requests:", metrics.peak_concurrent_requests),
        _line("Total Token throughput (tok/s):", metrics.total_token_throughput),
    ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        if name not in percentile_metrics:
            continue
        short, header = METRIC_LABELS[name]
        stats = metrics.latencies[name]
        lines.append(f"{header:-^{BLOCK_WIDTH}}")
        lines.append(_line(f"Mean {short} (ms):", stats.mean_ms))
        lines.append(_line(f"Median {short} (ms):", stats.median_ms))
        for p, value in stats.percentiles_ms.items():
            lines.append(_line(f"P{percentile_label(p)} {short} (ms):", value))
    lines.append("=" * BLOCK_WIDTH)
    return "\n".join(lines)


def metrics_json(metrics: BenchMetrics) -> dict[str, object]:
    """Aggregate metrics under vLLM's result keys (mean_ttft_ms, p99_itl_ms, ...)."""
    record: dict[str, object] = {
        "duration": metrics.duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input_tokens,
        "total_output_tokens": metrics.total_output_tokens,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "max_output_tokens_per_s": metrics.peak_output_throughput,
        "max_concurrent_requests": metrics.peak_concurrent_requests,
        "total_token_throughput": metrics.total_token_throughput,
        "output_tokens_per_second": metrics.output_tokens_per_second,
    }
    for name, stats in metrics.latencies.items():
        record[f"mean_{name}_ms"] = stats.mean_ms
        record[f"median_{name}_ms"] = stats.median_ms
        record[f"std_{name}_ms"] = stats.std_ms
        for p, value in stats.percentiles_ms.items():
            record[f"p{percentile_label(p)}_{name}_ms"] = value
    return record


def requests_json(outputs: Sequence[RequestOutput], run_start: float) -> dict[str, list[object]]:
    """Per-request columns (vLLM's names); times in seconds, start times from the start of the run."""
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "start_times": [o.start_time - run_start for o in outputs],
        "errors": [o.error for o in outputs],
    }
