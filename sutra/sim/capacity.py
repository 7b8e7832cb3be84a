"""Capacity search, as in Sarathi-Serve's evaluation: the highest request rate a deployment serves
within its latency SLOs.

Sarathi-Serve defines capacity as the highest QPS whose run keeps P99 time-between-tokens under the
SLO and the median scheduling delay (arrival to the first step that runs the request) under 2 s (without
the latter, a scheduler that never stalls decodes would "meet" the TBT SLO at any rate while its queue
grows without bound), and finds it by binary search over rates. The search here assumes the same thing
theirs does: SLO attainment is monotone in rate (a run that meets the SLOs at a rate meets them at every
lower rate). Every rate tried is kept with its key figures, so the latency-vs-rate curve comes with the
answer.

Goodput, as DistServe defines it, is the same search with a per-request criterion: a request
attains when its TTFT and its TPOT (mean time per output token after the first) are both within
their SLOs, and goodput is the highest rate at which at least a target share (90%) of requests
attain (`AttainmentSlo`, `find_goodput`). A request the run did not finish does not attain.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sutra.sim.simulator import SimRequest, SimResult, SimTrace


@dataclass(frozen=True)
class Slo:
    """Latency bounds on a run, in seconds; None means no bound. Percentiles are the simulator's
    (nearest rank over all requests, or over all token gaps for TBT)."""

    p99_tbt_s: float | None = None
    p50_tbt_s: float | None = None
    p99_ttft_s: float | None = None
    p50_ttft_s: float | None = None
    p50_scheduling_delay_s: float | None = None  # Sarathi-Serve's capacity bound (2 s)
    p99_scheduling_delay_s: float | None = None
    p99_e2e_s: float | None = None

    def violations(self, result: SimResult) -> list[str]:
        """Each bound the run misses, as 'name: value > bound'."""
        summary = result.summary()
        missed = []
        for name, bound in vars(self).items():
            if bound is None:
                continue
            q, metric = name.split("_", 1)
            value = summary[metric].get(q) if summary[metric] else None  # type: ignore[union-attr]
            if value is not None and value > bound:
                missed.append(f"{name}: {value:.4g} > {bound:.4g}")
        return missed

    def meets(self, result: SimResult) -> bool:
        return not self.violations(result)


def key_figures(result: SimResult) -> dict[str, float]:
    """The figures a capacity curve plots, from a run's summary."""
    summary = result.summary()
    figures: dict[str, float] = {}
    for metric in ("tbt_s", "ttft_s", "e2e_s", "tpot_s", "scheduling_delay_s"):
        for q, value in summary[metric].items():  # type: ignore[union-attr]
            if q in ("p50", "p99"):
                figures[f"{q}_{metric}"] = value
    figures["request_throughput"] = summary["request_throughput"]  # type: ignore[assignment]
    figures["num_preemptions"] = summary["num_preemptions"]  # type: ignore[assignment]
    return figures


@dataclass
class Trial:
    rate: float  # requests per second
    meets: bool
    figures: dict[str, float]


@dataclass
class CapacityResult:
    capacity: float  # the highest rate tried that met the SLOs; 0.0 if none did
    bracketed: bool  # False: even `high` after expanding met the SLOs (capacity is a lower bound)
    trials: list[Trial] = field(default_factory=list)  # in the order they ran

    def curve(self) -> list[Trial]:
        """Every trial by rate: the latency-vs-rate curve."""
        return sorted(self.trials, key=lambda t: t.rate)


@dataclass(frozen=True)
class AttainmentSlo:
    """DistServe's SLO: a request attains when TTFT <= ttft_s and TPOT <= tpot_s; a run meets it
    when at least `target` of its requests attain."""

    ttft_s: float
    tpot_s: float
    target: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0 and 0 < self.target <= 1):
            raise ValueError(
                f"need TTFT and TPOT SLOs > 0 and 0 < attainment target <= 1, got "
                f"{self.ttft_s}, {self.tpot_s}, {self.target}"
            )

    def attains(self, trace: SimTrace) -> bool:
        return bool(trace.token_times) and trace.ttft <= self.ttft_s and trace.tpot <= self.tpot_s

    def attainment(self, result: SimResult) -> float:
        """The share of the run's requests that attain (1.0 for an empty run)."""
        traces = result.traces.values()
        return sum(self.attains(t) for t in traces) / len(traces) if traces else 1.0

    def meets(self, result: SimResult) -> bool:
        return self.attainment(result) >= self.target

    def figures(self, result: SimResult) -> dict[str, float]:
        """key_figures plus the attainment: what a goodput search keeps of each rate."""
        return {**key_figures(result), "attainment": self.attainment(result)}


def keeps_up(result: SimResult, fraction: float) -> bool:
    """In the second half of the arrival window, requests finish at `fraction` of the rate they
    arrive or more. Past capacity the backlog grows, so completions fall behind arrivals; below it,
    both run at the offered rate once the first half has warmed the engine up (the drain after the
    last arrival is left out, so a short trace is not penalised for it)."""
    arrivals = sorted(t.arrival_time for t in result.traces.values())
    if len(arrivals) < 4 or arrivals[-1] <= arrivals[0]:
        return True  # all at once (or too few): there is no rate to keep up with
    mid, end = arrivals[len(arrivals) // 2], arrivals[-1]
    arrived = sum(1 for a in arrivals if mid < a <= end)
    done = sum(1 for t in result.traces.values() if t.token_times and mid < t.token_times[-1] <= end)
    return done >= fraction * arrived


def find_capacity(
    run_at_rate: Callable[[float], SimResult],
    meets: Callable[[SimResult], bool],
    low: float,
    high: float,
    tolerance: float = 0.02,
    max_expansions: int = 6,
    figures: Callable[[SimResult], dict[str, float]] = key_figures,
) -> CapacityResult:
    """The highest rate whose run meets the SLOs, to within `tolerance` (relative): the bracket
    [low, high] is widened (halving low while it fails, doubling high while it meets, at most
    `max_expansions` times each), then bisected until high / low - 1 <= tolerance. `figures` is
    what each trial keeps of its run."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    trials: dict[float, Trial] = {}

    def ok(rate: float) -> bool:
        if rate not in trials:
            result = run_at_rate(rate)
            trials[rate] = Trial(rate, bool(meets(result)), figures(result))
        return trials[rate].meets

    for _ in range(max_expansions):
        if ok(low):
            break
        low, high = low / 2, low
    if not ok(low):
        return CapacityResult(0.0, True, list(trials.values()))
    for _ in range(max_expansions):
        if not ok(high):
            break
        low, high = high, high * 2
    if ok(high):
        return CapacityResult(high, False, list(trials.values()))
    while high / low - 1 > tolerance:
        mid = math.sqrt(low * high)  # geometric: the tolerance is relative
        if ok(mid):
            low = mid
        else:
            high = mid
    return CapacityResult(low, True, list(trials.values()))


def find_goodput(
    run_at_rate: Callable[[float], SimResult],
    slo: AttainmentSlo,
    low: float,
    high: float,
    tolerance: float = 0.02,
    max_expansions: int = 6,
    keep_up: float = 0.0,
) -> CapacityResult:
    """DistServe's goodput: the highest rate at which `slo.target` of the requests attain; the
    capacity search with attainment as the criterion (each trial's figures carry it). With
    `keep_up` > 0 a rate must also keep up (`keeps_up`): a finite trace past capacity can end while
    its backlog still sits in memory (a prefill instance's parked requests, say) with most requests
    attaining."""

    def figures(result: SimResult) -> dict[str, float]:
        out = slo.figures(result)
        if keep_up > 0:
            out["keeps_up"] = float(keeps_up(result, keep_up))
        return out

    def passes(result: SimResult) -> bool:
        return slo.meets(result) and (keep_up <= 0 or keeps_up(result, keep_up))

    return find_capacity(run_at_rate, passes, low, high, tolerance, max_expansions, figures)


def poisson_workload(lengths: list[tuple[int, int]], rate: float, seed: int = 0) -> list[SimRequest]:
    """One request per (prompt, output) length pair, arriving as a Poisson process at `rate` per
    second. The unit-rate gaps come from `seed` alone, so every rate replays the same requests in the
    same order with only the gaps scaled by 1 / rate: runs at different rates differ only in load."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    requests, clock = [], 0.0
    for i, (prompt_len, output_len) in enumerate(lengths):
        clock += rng.expovariate(1.0)
        requests.append(SimRequest(f"r{i}", clock / rate, prompt_len, output_len))
    return requests


def lognormal_lengths(
    n: int,
    prompt: tuple[float, float],
    output: tuple[float, float],
    max_total: int,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """(prompt, output) lengths from lognormals fitted to a (median, P90) pair each, for a trace
    that is not at hand; pairs over `max_total` are drawn again (a trace filtered to the context)."""
    rng = random.Random(seed)

    def draw(median: float, p90: float) -> int:
        sigma = math.log(p90 / median) / 1.2815515655446004  # z of the 90th percentile
        return max(1, round(rng.lognormvariate(math.log(median), sigma)))

    lengths: list[tuple[int, int]] = []
    while len(lengths) < n:
        pair = draw(*prompt), draw(*output)
        if sum(pair) <= max_total:
            lengths.append(pair)
    return lengths
