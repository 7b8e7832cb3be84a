"""Capacity search: bisection finds a known threshold and records every rate, Slo checks each bound,
the Poisson workload replays the same requests at any rate, and on a simulated H100 Sarathi's
stall-free batching serves more load than prefill-first under a strict TBT SLO; goodput (DistServe)
is the same search over the share of requests meeting both a TTFT and a TPOT SLO."""

from __future__ import annotations

import statistics

import pytest

from sutra.config import SchedulerConfig
from sutra.sim.capacity import (
    AttainmentSlo,
    Slo,
    find_capacity,
    find_goodput,
    lognormal_lengths,
    poisson_workload,
)
from sutra.sim.roofline import RooflineCostModel, device_spec, kv_cache_blocks, model_shape
from sutra.sim.simulator import SimResult, SimTrace, Simulator


def result_with(tbt: float, ttft: float = 0.1, tokens: int = 4) -> SimResult:
    """A one-request run with a fixed TTFT and evenly spaced tokens."""
    trace = SimTrace(0.0, [ttft + k * tbt for k in range(tokens)], first_scheduled_time=ttft / 2)
    return SimResult({"r": trace}, trace.e2e, tokens, 0)


def synthetic(threshold: float, calls: list[float]):
    """run_at_rate whose TBT grows with rate and crosses 1 s exactly at `threshold`."""

    def run(rate: float) -> SimResult:
        calls.append(rate)
        return result_with(tbt=rate / threshold)

    return run


SLO_1S = Slo(p99_tbt_s=1.0)


@pytest.mark.parametrize(("low", "high"), [(0.5, 16.0), (0.01, 0.1), (50.0, 100.0)])
def test_bisection_finds_a_known_threshold(low, high):
    calls: list[float] = []
    result = find_capacity(synthetic(3.7, calls), SLO_1S.meets, low, high, tolerance=0.02)
    assert result.bracketed
    assert 3.7 / 1.02 <= result.capacity <= 3.7
    assert len(calls) == len(set(calls)) == len(result.trials)  # no rate runs twice
    curve = result.curve()
    assert [t.rate for t in curve] == sorted(calls)
    assert all(t.meets == (t.rate <= 3.7) for t in curve)
    assert curve[0].figures["p99_tbt_s"] == pytest.approx(curve[0].rate / 3.7)


def test_unbracketed_and_never_met_searches_say_so():
    beyond = find_capacity(synthetic(1e6, []), SLO_1S.meets, 1.0, 2.0, max_expansions=3)
    assert not beyond.bracketed and beyond.capacity == 16.0
    never = find_capacity(synthetic(1e-6, []), SLO_1S.meets, 1.0, 2.0, max_expansions=3)
    assert never.bracketed and never.capacity == 0.0
    with pytest.raises(ValueError):
        find_capacity(synthetic(1.0, []), SLO_1S.meets, 2.0, 1.0)


def test_slo_checks_each_bound():
    result = result_with(tbt=0.05, ttft=0.4, tokens=4)  # e2e = 0.4 + 3 * 0.05 = 0.55
    assert Slo().meets(result)  # no bounds, no constraint
    for name, value in [("p99_tbt_s", 0.05), ("p50_tbt_s", 0.05), ("p99_ttft_s", 0.4),
                        ("p50_ttft_s", 0.4), ("p99_e2e_s", 0.55),
                        ("p50_scheduling_delay_s", 0.2), ("p99_scheduling_delay_s", 0.2)]:  # fmt: skip
        assert Slo(**{name: value * 1.01}).meets(result), name
        missed = Slo(**{name: value * 0.99}).violations(result)
        assert len(missed) == 1 and missed[0].startswith(f"{name}: "), name
    assert len(Slo(p99_tbt_s=0.01, p50_ttft_s=0.1).violations(result)) == 2


def test_the_workload_is_reproducible_and_scales_with_rate():
    lengths = lognormal_lengths(400, (1730, 5696), (415, 834), 8192, seed=3)
    slow, fast = poisson_workload(lengths, 2.0, seed=7), poisson_workload(lengths, 8.0, seed=7)
    assert slow == poisson_workload(lengths, 2.0, seed=7)
    assert [(r.prompt_len, r.output_len) for r in slow] == lengths
    assert [r.request_id for r in fast] == [r.request_id for r in slow]
    for a, b in zip(slow, fast, strict=True):
        assert b.arrival_time == pytest.approx(a.arrival_time / 4)
    gaps = [b.arrival_time - a.arrival_time for a, b in zip(slow, slow[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.15)
    assert poisson_workload(lengths, 2.0, seed=8) != slow
    assert all(p + o <= 8192 for p, o in lengths)
    assert statistics.median(p for p, _ in lengths) == pytest.approx(1730, rel=0.2)


def test_sarathi_outserves_prefill_first_under_a_strict_tbt_slo():
    model = RooflineCostModel(device_spec("h100-sxm"), model_shape("llama-3-8b"))
    blocks = kv_cache_blocks(model.device, model.shape)
    lengths = lognormal_lengths(60, (3000, 6000), (60, 120), 8192, seed=0)
    slo = Slo(p99_tbt_s=0.05, p50_scheduling_delay_s=2.0)

    def capacity(mode: str, budget: int) -> float:
        config = SchedulerConfig(max_num_batched_tokens=budget, mode=mode)

        def run(rate: float) -> SimResult:
            return Simulator(config, model, blocks, max_model_len=8192).run(poisson_workload(lengths, rate))

        return find_capacity(run, slo.meets, 0.5, 8.0, tolerance=0.1).capacity

    sarathi, prefill_first = capacity("sarathi", 512), capacity("prefill_first", 8192)
    assert sarathi > 1.5 * prefill_first > 0


def test_a_request_attains_when_both_its_ttft_and_its_tpot_do():
    slo = AttainmentSlo(ttft_s=0.5, tpot_s=0.1, target=0.75)
    traces = {
        "fast": SimTrace(0.0, [0.4, 0.5, 0.6]),  # TTFT 0.4, TPOT 0.1
        "late": SimTrace(0.0, [0.6, 0.65]),  # TTFT over
        "slow": SimTrace(1.0, [1.1, 1.2, 1.5]),  # TPOT 0.2: one 0.3 s gap is enough
        "single": SimTrace(2.0, [2.2]),  # one token: no TPOT to miss
        "unfinished": SimTrace(3.0, []),
    }
    assert [slo.attains(t) for t in traces.values()] == [True, False, False, True, False]
    assert traces["slow"].tpot == pytest.approx(0.2) and traces["single"].tpot == 0.0
    result = SimResult(traces, 2.0, 5, 0)
    assert slo.attainment(result) == pytest.approx(0.4) and not slo.meets(result)
    assert AttainmentSlo(0.5, 0.25, target=0.6).meets(result)  # "slow" attains at 0.25 s
    assert result.summary()["tpot_s"]["p50"] == pytest.approx(0.1)  # over requests with two tokens+
    for bad in ((0.0, 0.1, 0.9), (0.5, 0.1, 0.0), (0.5, 0.1, 1.5)):
        with pytest.raises(ValueError):
            AttainmentSlo(*bad)


def test_goodput_is_the_highest_rate_at_which_the_target_share_attains():
    # 100 requests whose TTFT grows with the rate, each at its own pace: request k's TTFT is
    # rate * (k + 1) / 100 s, so exactly the requests with rate * (k + 1) <= 50 meet a 0.5 s SLO, and
    # 90% of them do up to a rate of 50 / 90.
    def run(rate: float) -> SimResult:
        traces = {str(k): SimTrace(0.0, [rate * (k + 1) / 100, 1.0]) for k in range(100)}
        return SimResult(traces, 1.0, 1, 0)

    slo = AttainmentSlo(ttft_s=0.5, tpot_s=10.0, target=0.9)
    result = find_goodput(run, slo, 0.1, 1.0, tolerance=0.01)
    assert result.bracketed and 50 / 90 / 1.01 <= result.capacity <= 50 / 90
    assert all(t.figures["attainment"] >= 0.9 for t in result.trials if t.meets)
    assert all(t.figures["attainment"] < 0.9 for t in result.trials if not t.meets)
    # Keeping up as well: these requests all arrive at once, so there is no rate to keep up with.
    assert find_goodput(run, slo, 0.1, 1.0, 0.01, keep_up=0.85).capacity == result.capacity
