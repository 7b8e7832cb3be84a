"""`sutra plan capacity`: the capacity search over simulated runs of the benchmark's workload. With one
seat and a constant 10 ms step, one-token requests are served at exactly 100 per second, so the
capacity is known to lie below that; the keep-up check and the SLO parsing are checked alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sutra.bench.config import BenchConfig
from sutra.bench.errors import BenchError
from sutra.cli import main
from sutra.config import CacheConfig, EngineConfig, SchedulerConfig
from sutra.sim.capacity import Slo
from sutra.sim.plan import keeps_up, parse_slos, plan_capacity
from sutra.sim.simulator import SimResult, SimTrace
from tests.sim.test_simulate import constant_profile

ONE_SEAT = EngineConfig(
    cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1)
)
ONE_TOKEN = BenchConfig(num_prompts=400, random_input_len=16, random_output_len=1)


def test_capacity_lies_below_the_service_rate_and_above_half_of_it(tmp_path: Path):
    profile = constant_profile(tmp_path / "p.json")
    result = plan_capacity(
        ONE_TOKEN, ONE_SEAT, profile, Slo(p50_ttft_s=0.05), low=10, high=40, tolerance=0.02
    )
    assert result.bracketed and 50 < result.capacity < 100
    curve = result.curve()
    assert [t.rate for t in curve] == sorted(t.rate for t in curve)
    passed = [t.rate for t in curve if t.meets]
    failed = [t.rate for t in curve if not t.meets]
    assert max(passed) == result.capacity < min(failed)


def test_keeping_up_is_judged_on_the_second_half_of_the_arrivals():
    def run(gap: float, service: float) -> SimResult:
        traces = {}
        free = 0.0
        for i in range(100):
            arrival = i * gap
            free = max(free, arrival) + service  # one at a time
            traces[str(i)] = SimTrace(arrival, [free])
        return SimResult(traces, free, 100, 0)

    assert keeps_up(run(gap=0.01, service=0.009), 0.85)  # below capacity
    assert not keeps_up(run(gap=0.01, service=0.02), 0.85)  # twice too slow: the backlog grows
    assert keeps_up(SimResult({"a": SimTrace(0.0, [5.0])}, 5.0, 1, 0), 0.85)  # nothing to keep up with


def test_slos_parse_from_milliseconds_and_bad_ones_are_refused():
    assert parse_slos(["p99_tbt:100", "p50_ttft:2000"]) == Slo(p99_tbt_s=0.1, p50_ttft_s=2.0)
    assert parse_slos(["p50_scheduling_delay:2000"]) == Slo(p50_scheduling_delay_s=2.0)
    for bad, message in [([], "at least one"), (["p98_tbt:5"], "NAME:MS"), (["p99_tbt:x"], "not a number")]:
        with pytest.raises(BenchError, match=message):
            parse_slos(bad)
    with pytest.raises(BenchError, match="> 0"):
        parse_slos(["p99_tbt:0"])


def test_the_cli_prints_the_curve_and_writes_json(tmp_path: Path, capsys):
    profile = constant_profile(tmp_path / "p.json")
    out = tmp_path / "plan.json"
    main(
        ["plan", "capacity", "--profile", str(profile), "--num-kv-blocks", "256", "--max-num-seqs", "1"]
        + ["--num-prompts", "200", "--random-input-len", "16", "--random-output-len", "1"]
        + ["--slo", "p50_ttft:50", "--low", "10", "--high", "40", "--tolerance", "0.05", "--output", str(out)]
    )
    printed = capsys.readouterr().out
    assert "SLOs: p50_ttft <= 50 ms" in printed and "capacity:" in printed
    record = json.loads(out.read_text())
    assert 50 < record["capacity_req_s"] < 100 and record["slo_s"] == {"p50_ttft_s": 0.05}
    assert len(record["trials"]) >= 3
