"""The per-token fast paths the scheduler takes for plain decodes decide exactly as the general code:
runs of decodes allocated at once, the Request-specific decodes-first split, and the diff without
unchanged requests that the simulator asks for."""

from __future__ import annotations

import copy
import random

import pytest

from sutra.config import SchedulerConfig
from sutra.core.batch_rules import BatchRules
from sutra.core.kv_cache import KVCacheManager
from sutra.core.request import RequestSpec
from sutra.sim.cost_model import CostModel
from sutra.sim.simulator import SimRequest, Simulator
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, step


def _decoding(kv: KVCacheManager, num: int, seed: int) -> list:
    """Requests with their prompts computed and one generated token each, as after a prefill."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        request = make_request(prompt_len=rng.randint(1, 30), max_tokens=1000)
        assert kv.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
        request.token_ids.append(7)
        requests.append(request)
    return requests


def _kv_state(kv: KVCacheManager) -> tuple:
    return (
        {rid: [b.block_id for b in table] for rid, table in kv.block_tables.items()},
        {h: b.block_id for h, b in kv.pool._cached.items()},
        list(kv.pool._free),
    )


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("num_blocks", [400, 60])  # 60: the pool runs short part way through
def test_allocate_decodes_is_allocate_one_token_each_in_order(prefix_caching: bool, num_blocks: int):
    kv = KVCacheManager(num_blocks, 4, prefix_caching)
    requests = _decoding(kv, 12, seed=num_blocks)
    twin = copy.deepcopy((kv, requests))
    stop = len(requests)
    for _ in range(40):  # steps; each request's computed tokens advance as a step would
        stop = kv.allocate_decodes(requests, 0, len(requests))
        expected = len(requests)
        for i, request in enumerate(twin[1]):
            if not twin[0].allocate(request, 1):
                expected = i
                break
        assert stop == expected
        assert _kv_state(kv) == _kv_state(twin[0])
        for request in requests[:stop] + twin[1][:stop]:
            request.num_computed_tokens += 1
            request.token_ids.append(7)
        if stop < len(requests):
            break
    assert (stop < len(requests)) == (num_blocks == 60)


def test_split_decodes_is_decodes_first_for_requests():
    requests = [make_request(prompt_len=n) for n in (5, 9, 3, 12, 1)]
    requests[0].num_computed_tokens = 4  # decode
    requests[1].num_computed_tokens = 2  # partial prefill
    requests[3].num_computed_tokens = 11  # decode
    decodes, prefills = BatchRules.split_decodes(requests)
    assert decodes + prefills == BatchRules.decodes_first(requests, lambda r: r.is_prefilling)
    assert decodes == [requests[0], requests[3], requests[4]]


def test_without_unchanged_requests_the_diff_loses_only_entries_with_no_new_block():
    full = make_scheduler(num_blocks=200, block_size=4, budget=64)
    lean = make_scheduler(num_blocks=200, block_size=4, budget=64)
    lean.report_unchanged_requests = False
    runners = FakeRunner(), FakeRunner()
    for k in range(10):
        request = make_request(prompt_len=10 + 7 * k, max_tokens=30)
        full.add_request(request)
        lean.add_request(copy.deepcopy(request))
    left_out = 0
    while full.has_unfinished_requests():
        a, b = step(full, runners[0]), step(lean, runners[1])
        left_out += len(a.cached_requests) - len(b.cached_requests)
        assert a.num_scheduled_tokens == b.num_scheduled_tokens
        assert [n.block_ids for n in a.new_requests] == [n.block_ids for n in b.new_requests]
        assert [vars(c) for c in a.cached_requests if c.new_block_ids] == [vars(c) for c in b.cached_requests]
        assert a.finished_request_ids == b.finished_request_ids
    assert not lean.has_unfinished_requests()
    assert left_out > 0


@pytest.mark.parametrize("policy", ["fcfs", "vtc", "priority"])
def test_a_simulation_does_not_depend_on_the_unchanged_requests(policy: str):
    rng = random.Random(3)
    requests, t = [], 0.0
    for i in range(120):
        t += rng.expovariate(40.0)
        spec = RequestSpec(client=f"c{i % 3}", priority=rng.choice([-1, 0, 1]))
        requests.append(SimRequest(f"r{i}", t, rng.randint(5, 300), rng.randint(1, 80), spec))
    config = SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=24, policy=policy)
    cost = CostModel((0.005, 2e-5, 1e-4, 0.0, 1e-7, 0.0))
    results = []
    for report in (True, False):
        sim = Simulator(config, cost, num_blocks=150, block_size=8)
        sim.scheduler.report_unchanged_requests = report
        results.append(sim.run(requests))
    full, lean = results
    assert full.num_preemptions > 0  # the pool is small enough to preempt
    assert (full.num_steps, full.num_preemptions, full.duration_s) == (
        lean.num_steps,
        lean.num_preemptions,
        lean.duration_s,
    )
    assert {k: vars(t) for k, t in full.traces.items()} == {k: vars(t) for k, t in lean.traces.items()}
