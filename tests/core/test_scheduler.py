"""Scheduler tests with a fake runner: budgets, stall-free batching, baselines, preemption."""

from __future__ import annotations

import math
import re

import pytest

from sutra.config import SchedulerConfig
from sutra.core.request import RequestStatus
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, run_to_completion, step


def _start_decodes(scheduler, runner, count: int, max_tokens: int = 10_000) -> list:
    reqs = [make_request(prompt_len=4, max_tokens=max_tokens) for _ in range(count)]
    for r in reqs:
        scheduler.add_request(r)
    while any(r.is_prefilling or r.num_computed_tokens == 0 for r in reqs):
        step(scheduler, runner)
    return reqs


def test_no_iteration_exceeds_budget():
    scheduler, runner = make_scheduler(budget=64), FakeRunner()
    for n in (5, 100, 300, 17, 64, 65, 1):
        scheduler.add_request(make_request(prompt_len=n, max_tokens=20))
    run_to_completion(scheduler, runner)
    assert runner.steps and all(s.total_num_scheduled_tokens <= 64 for s in runner.steps)
    assert max(s.total_num_scheduled_tokens for s in runner.steps) == 64


def test_long_prompt_piggybacks_on_running_decodes():
    """Sarathi-Serve: 100 decodes run, a 10K-token prompt arrives; every iteration carries all 100
    decodes and the prompt completes in ceil(10000 / (budget - 100)) iterations."""
    budget = 512
    scheduler, runner = make_scheduler(num_blocks=4000, budget=budget), FakeRunner()
    decodes = _start_decodes(scheduler, runner, 100)
    long = make_request(prompt_len=10_000, max_tokens=5)
    scheduler.add_request(long)
    iterations = 0
    while long.num_output_tokens == 0:
        out = step(scheduler, runner)
        iterations += 1
        assert out.total_num_scheduled_tokens <= budget
        assert all(out.num_scheduled_tokens.get(d.request_id) == 1 for d in decodes)
    assert iterations == math.ceil(10_000 / (budget - 100)) == 25


def test_prefill_first_stalls_decodes():
    budget = 512
    scheduler, runner = make_scheduler(num_blocks=4000, budget=budget, mode="prefill_first"), FakeRunner()
    decodes = _start_decodes(scheduler, runner, 100)
    long = make_request(prompt_len=10_000, max_tokens=5)
    scheduler.add_request(long)
    out = step(scheduler, runner)
    # The whole prompt runs alone; every decode is paused for that iteration.
    assert out.num_scheduled_tokens == {long.request_id: 10_000}
    assert not any(d.request_id in out.num_scheduled_tokens for d in decodes)
    out = step(scheduler, runner)
    assert all(out.num_scheduled_tokens.get(d.request_id) == 1 for d in decodes)


def test_no_chunking_admits_whole_prompts_beside_decodes():
    scheduler, runner = make_scheduler(num_blocks=4000, budget=512, mode="no_chunking"), FakeRunner()
    decodes = _start_decodes(scheduler, runner, 10)
    long = make_request(prompt_len=2000, max_tokens=5)
    scheduler.add_request(long)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens[long.request_id] == 2000
    assert all(out.num_scheduled_tokens[d.request_id] == 1 for d in decodes)


def test_max_num_seqs_caps_running():
    scheduler, runner = make_scheduler(max_seqs=3), FakeRunner()
    for _ in range(10):
        scheduler.add_request(make_request(prompt_len=4, max_tokens=5))
    while scheduler.has_unfinished_requests():
        out = step(scheduler, runner)
        assert len(out.num_scheduled_tokens) <= 3
        assert len(scheduler.running) <= 3


def test_outputs_and_finish_reasons():
    scheduler, runner = make_scheduler(), FakeRunner(token=7)
    length = make_request(prompt_len=20, max_tokens=3)
    stopped = make_request(prompt_len=20, max_tokens=3)
    stopped.sampling_params.stop_token_ids = [7]
    eos = make_request(prompt_len=20, max_tokens=3, eos_token_ids=frozenset({7}))
    eos.sampling_params.ignore_eos = False
    for r in (length, stopped, eos):
        scheduler.add_request(r)
    run_to_completion(scheduler, runner)
    assert length.output_token_ids == [7, 7, 7] and length.status is RequestStatus.FINISHED_LENGTH
    assert stopped.output_token_ids == [7] and stopped.status is RequestStatus.FINISHED_STOPPED
    assert eos.output_token_ids == [7] and eos.status is RequestStatus.FINISHED_STOPPED
    assert scheduler.kv.num_free_blocks == scheduler.kv.pool.num_blocks


def test_max_model_len_ends_generation():
    scheduler, runner = make_scheduler(max_model_len=24), FakeRunner()
    r = make_request(prompt_len=20, max_tokens=100)
    scheduler.add_request(r)
    run_to_completion(scheduler, runner)
    assert r.num_tokens == 24 and r.status is RequestStatus.FINISHED_LENGTH


def test_prefix_cache_hit_starts_further_on():
    scheduler, runner = make_scheduler(block_size=16), FakeRunner()
    shared = list(range(100, 100 + 64))
    first = make_request(tokens=shared + [1, 2, 3], max_tokens=2)
    scheduler.add_request(first)
    run_to_completion(scheduler, runner)
    second = make_request(tokens=shared + [4, 5], max_tokens=2)
    scheduler.add_request(second)
    out = step(scheduler, runner)
    assert second.num_cached_tokens == 64
    assert out.new_requests[0].num_computed_tokens == 64
    assert out.num_scheduled_tokens[second.request_id] == 2
    # A fully cached prompt still computes its last token (the last block is recomputed).
    third = make_request(tokens=shared, max_tokens=2)
    scheduler.add_request(third)
    out = step(scheduler, runner)
    assert third.num_cached_tokens == 48 and out.num_scheduled_tokens[third.request_id] == 16
    kv = scheduler.kv
    assert kv.prefix_hits == 64 + 48
    assert kv.prefix_queries == first.num_prompt_tokens + second.num_prompt_tokens + third.num_prompt_tokens
    run_to_completion(scheduler, runner)
    assert scheduler.kv.num_free_blocks == scheduler.kv.pool.num_blocks


def test_preemption_by_recompute_when_blocks_run_out():
    # 4 requests of 30 + 40 tokens need 5 blocks of 16 each, but only 12 blocks exist.
    scheduler, runner = make_scheduler(num_blocks=12, block_size=16, budget=256), FakeRunner()
    reqs = [make_request(prompt_len=30, max_tokens=40) for _ in range(4)]
    for r in reqs:
        scheduler.add_request(r)
    run_to_completion(scheduler, runner)
    assert scheduler.num_preemptions > 0
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 40 for r in reqs)
    assert scheduler.kv.num_free_blocks == 12
    # The runner was told to drop preempted state and saw the request again as new.
    preempted = {rid for s in runner.steps for rid in s.preempted_request_ids}
    assert preempted
    resumed = [
        n for s in runner.steps for n in s.new_requests if n.request_id in preempted and len(n.token_ids) > 30
    ]
    assert resumed and all(n.num_prompt_tokens == 30 for n in resumed)


def test_preempted_request_resumes_before_newer_ones():
    scheduler, runner = make_scheduler(num_blocks=6, block_size=16, budget=256), FakeRunner()
    a = make_request(prompt_len=40, max_tokens=40)
    b = make_request(prompt_len=40, max_tokens=40)
    scheduler.add_request(a)
    scheduler.add_request(b)
    while scheduler.num_preemptions == 0:
        step(scheduler, runner)
    victim = a if a.status is RequestStatus.PREEMPTED else b
    late = make_request(prompt_len=4, max_tokens=2)
    scheduler.add_request(late)
    assert scheduler.policy.peek() is victim


def test_abort_frees_blocks_in_every_state():
    scheduler, runner = make_scheduler(num_blocks=64, budget=32), FakeRunner()
    running = make_request(prompt_len=20, max_tokens=50)
    partial = make_request(prompt_len=200, max_tokens=5)
    waiting = make_request(prompt_len=20, max_tokens=5)
    scheduler.add_request(running)
    step(scheduler, runner)
    scheduler.add_request(partial)
    step(scheduler, runner)
    assert partial.status is RequestStatus.RUNNING and partial.is_prefilling
    scheduler.add_request(waiting)
    scheduler.abort_requests([running.request_id, partial.request_id, waiting.request_id, "unknown"])
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv.num_free_blocks == 64
    out = scheduler.schedule()
    assert set(out.finished_request_ids) == {running.request_id, partial.request_id}


def test_prompt_larger_than_cache_is_rejected():
    scheduler = make_scheduler(num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(make_request(prompt_len=100))
    assert not scheduler.has_unfinished_requests()


def test_duplicate_request_id_rejected():
    scheduler = make_scheduler()
    r = make_request()
    scheduler.add_request(r)
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(r)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("max_num_batched_tokens", 0, "max_num_batched_tokens must be >= 1, got 0"),
        ("max_num_seqs", 0, "max_num_seqs must be >= 1, got 0"),
        ("mode", "orca", "mode must be sarathi, prefill_first or no_chunking, got 'orca'"),
    ],
)
def test_invalid_scheduler_config(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SchedulerConfig(**{field: value})


# ---- requests that outgrow the KV pool -------------------------------------------------------------------


def test_lone_request_that_outgrows_the_kv_pool_ends_with_length():
    """Alone in the engine, a request whose output would not fit in the whole pool used to preempt
    itself, be readmitted and hit the same wall forever. It stops at the pool's size instead."""
    scheduler, runner = make_scheduler(num_blocks=4, block_size=16, budget=64), FakeRunner()
    assert scheduler.max_request_tokens == 64
    request = make_request(prompt_len=8, max_tokens=1000)
    scheduler.add_request(request)
    run_to_completion(scheduler, runner, max_steps=500)
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.num_tokens == 64
    assert scheduler.num_preemptions == 0
    assert scheduler.kv.num_free_blocks == 4


def test_request_that_outgrows_the_pool_beside_others_ends_and_the_others_finish():
    scheduler, runner = make_scheduler(num_blocks=6, block_size=16, budget=64), FakeRunner()
    big = make_request(prompt_len=8, max_tokens=1000)
    small = [make_request(prompt_len=20, max_tokens=30) for _ in range(2)]
    for r in (big, *small):
        scheduler.add_request(r)
    run_to_completion(scheduler, runner, max_steps=2000)
    assert big.status is RequestStatus.FINISHED_LENGTH and big.num_tokens == 96
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 30 for r in small)
    assert scheduler.kv.num_free_blocks == 6


def test_max_request_tokens_is_the_context_length_when_the_pool_is_larger():
    assert make_scheduler(num_blocks=100, block_size=16, max_model_len=512).max_request_tokens == 512


# ---- voiding a request's last slice ------------------------------------------------------------------


def test_preempt_request_voids_the_last_slice_and_the_request_recomputes():
    scheduler, runner = make_scheduler(num_blocks=64, budget=64), FakeRunner()
    keep = make_request(prompt_len=20, max_tokens=6)
    voided = make_request(prompt_len=20, max_tokens=6)
    scheduler.add_request(keep)
    scheduler.add_request(voided)
    out = scheduler.schedule()
    runner_out = runner.execute(out)
    scheduler.preempt_request(voided.request_id)
    updated = scheduler.update_from_output(out, runner_out)
    assert updated == [keep]  # the voided slice gave no token and no progress
    assert voided.status is RequestStatus.PREEMPTED
    assert voided.num_computed_tokens == 0 and voided.num_output_tokens == 0
    nxt = step(scheduler, runner)
    # The runner is told to drop its state, then gets the request again from scratch.
    assert voided.request_id in nxt.finished_request_ids
    assert [n.request_id for n in nxt.new_requests] == [voided.request_id]
    assert nxt.new_requests[0].num_computed_tokens == 0
    run_to_completion(scheduler, runner)
    assert keep.num_output_tokens == voided.num_output_tokens == 6
    assert scheduler.kv.num_free_blocks == 64
    scheduler.preempt_request(voided.request_id)  # finished: nothing to do
