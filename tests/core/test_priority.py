"""Priority classes: ordering, fairness within a class, and preemption of less urgent running
requests so an urgent one starts at once on a full engine (seats, KV or token budget)."""

from __future__ import annotations

from sutra.core.policies import PriorityPolicy
from sutra.core.request import RequestStatus
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, run_to_completion, step
from tests.core.workload import Client, ServiceMeter, run


def test_waiting_order_is_priority_then_arrival():
    policy = PriorityPolicy()
    low1, high1, low2, high2 = (make_request(priority=p) for p in (1, 0, 1, 0))
    for r in (low1, high1, low2, high2):
        policy.add(r)
    assert policy.waiting_order() == [high1, high2, low1, low2]
    assert [policy.pop() for _ in range(2)] == [high1, high2]
    policy.requeue(high1)  # a preempted request goes back first within its class
    assert [policy.pop() for _ in range(3)] == [high1, low1, low2]
    assert len(policy) == 0 and policy.peek() is None


def _check_finished(scheduler, runner, requests, victim, num_blocks):
    carried = list(victim.token_ids)  # at preemption: prompt plus what it had generated
    run_to_completion(scheduler, runner)
    for r in requests:
        max_tokens = r.sampling_params.max_tokens
        assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7] * max_tokens
    assert scheduler.kv.num_free_blocks == num_blocks
    # The runner dropped the victim's state and later got it back whole, generated tokens included
    # (part of it may come from the prefix cache), and recomputed it.
    seen = [n for s in runner.steps for n in s.new_requests if n.request_id == victim.request_id]
    assert len(seen) == 2 and seen[1].num_prompt_tokens == victim.num_prompt_tokens
    assert seen[1].token_ids == carried and seen[1].num_computed_tokens < len(carried)


def _full_of_low(policy: str, max_seqs: int = 2, **kw):
    scheduler, runner = make_scheduler(max_seqs=max_seqs, policy=policy, **kw), FakeRunner()
    low = [make_request(8, max_tokens=50, priority=1) for _ in range(2)]
    for r in low:
        scheduler.add_request(r)
    for _ in range(3):
        step(scheduler, runner)
    return scheduler, runner, low


def test_urgent_request_preempts_when_seats_are_full():
    scheduler, runner, low = _full_of_low("priority")
    high = make_request(8, max_tokens=5, priority=0)
    scheduler.add_request(high)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens.get(high.request_id) == 8  # starts in the very next iteration
    assert out.preempted_request_ids == [low[1].request_id]  # the later of the less urgent ones
    assert low[1].status is RequestStatus.PREEMPTED and out.num_scheduled_tokens[low[0].request_id] == 1
    _check_finished(scheduler, runner, low + [high], low[1], 1000)
    assert scheduler.num_preemptions == 1


def test_fcfs_and_equal_priority_never_preempt_for_a_newcomer():
    for policy, priority in (("fcfs", 0), ("priority", 1)):
        scheduler, runner, low = _full_of_low(policy)
        newcomer = make_request(8, max_tokens=5, priority=priority)
        scheduler.add_request(newcomer)
        out = step(scheduler, runner)
        assert newcomer.request_id not in out.num_scheduled_tokens and scheduler.num_preemptions == 0


def test_urgent_request_preempts_when_kv_is_full():
    num_blocks = 10
    scheduler, runner = make_scheduler(num_blocks=num_blocks, block_size=16, policy="priority"), FakeRunner()
    low = [make_request(60, max_tokens=10, priority=1) for _ in range(2)]
    for r in low:
        scheduler.add_request(r)
    for _ in range(6):  # both pass 64 tokens and take a 5th block: the cache is full
        step(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 0 and len(scheduler.running) == 2
    high = make_request(40, max_tokens=3, priority=0)
    scheduler.add_request(high)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens.get(high.request_id) == 40
    assert out.preempted_request_ids == [low[1].request_id]
    _check_finished(scheduler, runner, low + [high], low[1], num_blocks)


def test_urgent_request_evicts_the_fewest_least_entitled():
    scheduler, runner = make_scheduler(num_blocks=9, block_size=16, policy="priority"), FakeRunner()
    low = [make_request(40, max_tokens=5, priority=1) for _ in range(3)]  # 3 blocks each, no growth
    low.append(make_request(40, max_tokens=5, priority=2))  # waits: the cache is full
    for r in low:
        scheduler.add_request(r)
    step(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 0
    high = make_request(70, max_tokens=3, priority=0)  # 5 blocks: two victims are needed
    scheduler.add_request(high)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens.get(high.request_id) == 70
    assert out.preempted_request_ids == [low[2].request_id, low[1].request_id]
    assert low[0].status is RequestStatus.RUNNING
    run_to_completion(scheduler, runner)
    assert all(r.output_token_ids == [7] * r.sampling_params.max_tokens for r in low + [high])
    assert scheduler.kv.num_free_blocks == 9


def test_urgent_request_preempts_when_the_budget_is_taken():
    scheduler, runner = make_scheduler(budget=64, policy="priority"), FakeRunner()
    long = make_request(2000, max_tokens=3, priority=1)
    scheduler.add_request(long)
    for _ in range(2):
        assert step(scheduler, runner).num_scheduled_tokens == {long.request_id: 64}
    high = make_request(8, max_tokens=3, priority=0)
    scheduler.add_request(high)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens[high.request_id] == 8 and out.preempted_request_ids == [long.request_id]
    _check_finished(scheduler, runner, [long, high], long, 1000)


def test_short_of_kv_a_less_urgent_request_preempts_itself_not_a_more_urgent_one():
    scheduler, runner = (
        make_scheduler(num_blocks=8, block_size=16, budget=32, policy="priority"),
        FakeRunner(),
    )
    high = make_request(15, max_tokens=60, priority=0)
    scheduler.add_request(high)
    step(scheduler, runner)
    low = make_request(110, max_tokens=5, priority=1)  # 7 of the 8 blocks, prefilled in chunks
    scheduler.add_request(low)
    # The urgent decode grows into a block the chunked prompt still needs: the prompt gives way.
    run_to_completion(scheduler, runner)
    assert high.num_preemptions == 0 and low.num_preemptions >= 1
    assert high.output_token_ids == [7] * 60 and low.output_token_ids == [7] * 5
    assert scheduler.kv.num_free_blocks == 8


def test_no_preemption_when_it_would_not_make_room():
    scheduler, runner = make_scheduler(num_blocks=10, block_size=16, policy="priority"), FakeRunner()
    big = make_request(100, max_tokens=5, priority=0)  # 7 blocks
    low = make_request(20, max_tokens=5, priority=1)  # 2 blocks
    for r in (big, low):
        scheduler.add_request(r)
    step(scheduler, runner)
    high = make_request(60, max_tokens=3, priority=0)  # 4 blocks: 1 free + low's 2 are not enough
    scheduler.add_request(high)
    out = step(scheduler, runner)
    assert high.request_id not in out.num_scheduled_tokens
    assert scheduler.num_preemptions == 0 and low.status is RequestStatus.RUNNING
    run_to_completion(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 10


def test_fairness_within_a_priority_class():
    # Reference bound for backlogged clients (osdi24-a.md, VTC "Guarantee"): 2U with
    # U = max(w_p * L_input, w_q * M), M the batch token capacity: 64 blocks * 16 tokens.
    u = max(1.0 * 32, 2.0 * 64 * 16)

    def serve(policy: str) -> tuple[float, int]:
        scheduler = make_scheduler(num_blocks=64, max_seqs=16, policy=policy, prefix_caching=False)
        fast, slow = Client("fast", every=1), Client("slow", every=2)
        bulk = Client("bulk", backlog=8, priority=1)
        late_bulk = []  # less urgent requests started (or resumed) after the first iterations

        def on_step(it: int, out) -> None:
            if it >= 100:
                late_bulk.extend(
                    n for n in out.new_requests if scheduler.requests[n.request_id].priority == 1
                )

        meter = ServiceMeter()
        run(scheduler, [fast, slow, bulk], 1500, meter=meter, on_step=on_step)
        return abs(meter.service["fast"] - meter.service["slow"]), len(late_bulk)

    vtc_diff, vtc_bulk = serve("priority-vtc")
    fcfs_diff, fcfs_bulk = serve("priority")
    assert vtc_diff <= 2 * u < 5 * u < fcfs_diff  # fair within the class only with VTC inside
    assert vtc_bulk == fcfs_bulk == 0  # the less urgent class waits while the urgent one is backlogged
