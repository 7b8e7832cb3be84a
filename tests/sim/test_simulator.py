"""The simulator runs the real scheduler in simulated time: exact latencies under a constant-cost
model, chunked prefill and decodes priced by the cost model, preemptions under a small KV pool, and a
policy's order (priority) showing in the simulated TTFTs."""

from __future__ import annotations

import pytest

from sutra.config import SchedulerConfig
from sutra.core.request import RequestSpec
from sutra.sim.cost_model import CostModel
from sutra.sim.simulator import SimRequest, Simulator

CONSTANT = CostModel((0.01, 0.0, 0.0, 0.0, 0.0, 0.0))  # every step takes 10 ms


def test_one_request_takes_its_prefill_chunks_then_one_step_per_token():
    sim = Simulator(SchedulerConfig(max_num_batched_tokens=64), CONSTANT, num_blocks=64)
    result = sim.run([SimRequest("r", arrival_time=1.0, prompt_len=150, output_len=5)])
    trace = result.traces["r"]
    # 150 prompt tokens in chunks of 64: 3 steps, the third samples the first token; 4 decodes follow.
    assert trace.ttft == pytest.approx(0.03)
    assert trace.tbts == pytest.approx([0.01] * 4)
    assert trace.e2e == pytest.approx(0.07) and result.num_steps == 7
    assert result.duration_s == pytest.approx(0.07)
    assert trace.scheduling_delay == pytest.approx(0.0)  # an idle engine runs it on arrival


def test_scheduling_delay_is_the_wait_before_the_first_step_that_runs_the_request():
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1)
    sim = Simulator(config, CONSTANT, num_blocks=64)
    requests = [SimRequest("first", 0.0, 32, 5), SimRequest("second", 0.001, 32, 5)]
    result = sim.run(requests)
    first, second = result.traces["first"], result.traces["second"]
    # One seat: "second" waits for "first"'s 5 steps (its prefill samples the first token).
    assert first.scheduling_delay == pytest.approx(0.0)
    assert second.first_scheduled_time == pytest.approx(first.token_times[-1])
    assert second.scheduling_delay == pytest.approx(0.05 - 0.001)
    assert second.ttft == pytest.approx(second.scheduling_delay + 0.01)  # its prefill is one step
    delays = result.summary()["scheduling_delay_s"]
    assert delays["p99"] == pytest.approx(0.049)


def test_prefill_first_stalls_decodes_that_sarathi_keeps_running():
    def tbt_p99(mode: str) -> float:
        model = CostModel((0.005, 2e-4, 0.0, 0.0, 0.0, 0.0))
        sim = Simulator(SchedulerConfig(max_num_batched_tokens=256, mode=mode), model, num_blocks=512)
        requests = [
            SimRequest(f"r{i}", arrival_time=0.05 * i, prompt_len=1000, output_len=40) for i in range(8)
        ]
        return sim.run(requests).summary()["tbt_s"]["p99"]

    assert tbt_p99("sarathi") < tbt_p99("prefill_first")


def test_a_small_pool_preempts_and_everything_still_finishes():
    sim = Simulator(SchedulerConfig(max_num_batched_tokens=512), CONSTANT, num_blocks=12)
    requests = [SimRequest(f"r{i}", arrival_time=0.0, prompt_len=40, output_len=60) for i in range(4)]
    result = sim.run(requests)
    assert result.num_preemptions > 0
    assert all(len(t.token_times) == 60 for t in result.traces.values())
    assert sim.kv.num_free_blocks == 12


def test_the_policy_orders_admission_in_simulated_time():
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1, policy="priority")
    sim = Simulator(config, CONSTANT, num_blocks=64)
    requests = [
        SimRequest("low", 0.0, 32, 10, RequestSpec(priority=5)),
        SimRequest("later-low", 0.001, 32, 10, RequestSpec(priority=5)),
        SimRequest("urgent", 0.002, 32, 10, RequestSpec(priority=0)),
    ]
    traces = sim.run(requests).traces
    # One seat: "urgent" preempts the running low-priority request and goes first.
    assert traces["urgent"].token_times[-1] < traces["later-low"].token_times[0]
    assert traces["urgent"].ttft < traces["low"].e2e
