"""Completion-time estimates: the online latency fit, forking a live scheduler, and the estimate as a
simulation of the fork (the simulator's finish times, exactly; the original untouched)."""

from __future__ import annotations

import copy
import enum
import math
import random
import time
from collections import deque

import pytest

from sutra.config import SchedulerConfig
from sutra.core.policies import POLICIES
from sutra.core.policies.rpm import RPMPolicy
from sutra.core.request import Request, RequestSpec
from sutra.core.scheduler import Scheduler
from sutra.sampling_params import SamplingParams
from sutra.sim.estimator import CompletionEstimator, StepLatencyModel
from sutra.sim.fork import fork_scheduler
from sutra.sim.simulator import SimEngine, SimRequest, Simulator
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, step

TRUE = (0.004, 3e-5, 2e-4)  # the synthetic machine: a + b * tokens + c * seqs seconds per step


def _step_time(tokens: int, seqs: int) -> float:
    return TRUE[0] + TRUE[1] * tokens + TRUE[2] * seqs


def test_fit_recovers_known_coefficients():
    rng = random.Random(0)
    model = StepLatencyModel()
    assert model.coefficients == model.prior  # nothing observed yet
    for _ in range(400):
        tokens, seqs = rng.randint(1, 512), rng.randint(1, 64)
        model.observe(tokens, seqs, _step_time(tokens, seqs) * rng.uniform(0.98, 1.02))
    for got, want in zip(model.coefficients, TRUE, strict=True):
        assert got == pytest.approx(want, rel=0.05)
    assert model.predict(256, 32) == pytest.approx(_step_time(256, 32), rel=0.01)
    # As a StepCost: the new tokens and the number of slices; the cached context is no feature.
    assert model.step_seconds([(0, 200), (500, 1), (90, 55)]) == model.predict(256, 3)


def test_fit_is_sane_with_few_or_degenerate_samples():
    one = StepLatencyModel()
    one.observe(100, 4, 0.05)
    prior = StepLatencyModel().predict(100, 4)
    assert min(prior, 0.05) < one.predict(100, 4) < max(prior, 0.05)  # between prior and data
    flat = StepLatencyModel()  # every step has 8 sequences: a and c cannot be told apart
    for tokens in range(8, 500, 7):
        flat.observe(tokens, 8, _step_time(tokens, 8))
    assert flat.predict(300, 8) == pytest.approx(_step_time(300, 8), rel=0.02)
    flat.observe(0, 0, 1.0)  # an empty step teaches nothing
    assert flat.predict(300, 8) == pytest.approx(_step_time(300, 8), rel=0.02)
    with pytest.raises(ValueError, match="seconds"):
        flat.observe(10, 1, -1.0)


def _trained(max_steps: int = 10_000) -> CompletionEstimator:
    estimator = CompletionEstimator(max_steps=max_steps, max_wall_s=math.inf)  # exact: no wall budget
    rng = random.Random(1)
    for _ in range(200):
        tokens, seqs = rng.randint(1, 256), rng.randint(1, 8)
        estimator.observe(tokens, seqs, _step_time(tokens, seqs))
    return estimator


def _finish_times(scheduler, runner, requests) -> dict[str, float]:
    """Run with the synthetic clock until all of `requests` finish; their finish times."""
    clock, done = 0.0, {}
    while len(done) < len(requests):
        out = step(scheduler, runner)
        clock += _step_time(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens))
        for r in requests:
            if r.status.finished and r.request_id not in done:
                done[r.request_id] = clock
    return done


def test_estimate_grows_with_queue_position_and_matches_the_run():
    scheduler, runner = make_scheduler(budget=128, max_seqs=4, policy="fcfs"), FakeRunner()
    rng = random.Random(2)
    reqs = [make_request(rng.randint(20, 300), max_tokens=rng.randint(5, 40)) for _ in range(13)]
    front, back = make_request(100, max_tokens=20), make_request(100, max_tokens=20)  # same shape
    reqs = reqs[:4] + [front] + reqs[4:] + [back]
    for r in reqs[:4]:
        scheduler.add_request(r)
    for _ in range(3):
        step(scheduler, runner)
    for r in reqs[4:]:
        scheduler.add_request(r)
    assert scheduler.policy.waiting_order()[0] is front and scheduler.policy.waiting_order()[-1] is back
    estimator = _trained()
    estimates = {r.request_id: estimator.estimate_finish(r, scheduler) for r in reqs}
    assert estimates[front.request_id] * 2 < estimates[back.request_id]
    # One simulation for all of them gives what one per request gives.
    assert estimator.estimate_finishes(reqs, scheduler) == [estimates[r.request_id] for r in reqs]
    actual = _finish_times(scheduler, runner, reqs)
    # Nothing arrives and memory is ample, so only the latency fit separates estimate and outcome.
    for r in reqs:
        assert estimates[r.request_id] == pytest.approx(actual[r.request_id], rel=0.05)


def test_estimate_follows_the_policy_order():
    # Under VTC the light client's request overtakes the heavy client's queue; FCFS order would
    # put it last. The estimate must follow the policy.
    scheduler, runner = make_scheduler(budget=256, max_seqs=2, policy="vtc"), FakeRunner()
    heavy = [make_request(64, max_tokens=30, client="heavy") for _ in range(8)]
    light = make_request(64, max_tokens=30, client="light")
    for r in heavy + [light]:
        scheduler.add_request(r)
    estimator = _trained()
    estimate = estimator.estimate_finish(light, scheduler)
    last_heavy = estimator.estimate_finish(heavy[-1], scheduler)
    actual = _finish_times(scheduler, runner, heavy + [light])
    assert estimate == pytest.approx(actual[light.request_id], rel=0.05)
    assert last_heavy == pytest.approx(actual[heavy[-1].request_id], rel=0.05)
    assert actual[light.request_id] < actual[heavy[-1].request_id] / 2


@pytest.mark.parametrize(
    ("policy", "mode", "num_blocks"),
    [("fcfs", "sarathi", 400), ("vtc", "no_chunking", 40), ("priority", "prefill_first", 60)],
)
def test_estimate_is_the_simulators_finish_time(policy, mode, num_blocks):
    """Same scheduler state, same cost model, nothing else arriving: the same finish times, exactly
    (preemptions under the small pools, prefix hits on the shared prompt prefix included)."""
    estimator = _trained()
    config = SchedulerConfig(max_num_batched_tokens=96, max_num_seqs=6, mode=mode, policy=policy)
    sim = Simulator(config, estimator.model, num_blocks=num_blocks)
    rng = random.Random(3)
    shared = [rng.randrange(100, 50_000) for _ in range(64)]

    def spec(i: int) -> SimRequest:
        tail = [rng.randrange(100, 50_000) for _ in range(rng.randint(8, 120))]
        prompt = shared + tail if i % 3 == 0 else tail
        client = RequestSpec(client=f"c{i % 3}", priority=i % 2)
        return SimRequest(f"r{i}", 0.0, len(prompt), rng.randint(3, 60), client, prompt)

    early = [sim.engine.add(spec(i)) for i in range(8)]
    for _ in range(12):  # mid-run: some running, some prefilling, some waiting
        sim.engine.step()
    late = [sim.engine.add(spec(i)) for i in range(8, 20)]
    arriving = Request("new", shared + [5, 6, 7], SamplingParams(max_tokens=25), arrival_time=99.0)
    targets = [r for r in early + late if not r.status.finished]
    estimates = estimator.estimate_finishes(targets + [arriving], sim.scheduler)
    # The request the scheduler does not hold joins the back of the queue, as add_request would.
    sim.engine.add(
        SimRequest("new", 99.0, len(arriving.prompt_token_ids), 25, RequestSpec(), shared + [5, 6, 7])
    )
    sim.engine.now = 0.0  # estimates count from now
    result = sim.run([])
    actual = [result.traces[r.request_id].token_times[-1] for r in targets + [arriving]]
    assert estimates == actual
    if num_blocks < 100:
        assert result.num_preemptions > 0


def _summary(scheduler: Scheduler) -> dict[str, object]:
    """Everything the scheduler decides on, as plain values."""
    return {
        "running": [r.request_id for r in scheduler.running],
        "waiting": [r.request_id for r in scheduler.policy.waiting_order()],
        "requests": {
            rid: (r.status, r.num_computed_tokens, list(r.token_ids), r.sampling_params.max_tokens)
            for rid, r in scheduler.requests.items()
        },
        "free": scheduler.kv.num_free_blocks,
        "tables": {rid: scheduler.kv.block_ids(rid) for rid in scheduler.requests},
        "counters": dict(getattr(scheduler.policy, "counters", {})),
        "runner": dict(scheduler._runner_blocks),
        "preemptions": scheduler.num_preemptions,
    }


def test_the_original_scheduler_is_untouched():
    scheduler, runner = make_scheduler(num_blocks=40, budget=96, max_seqs=6, policy="vtc"), FakeRunner()
    reqs = [make_request(40 + 9 * i, max_tokens=30, client=f"c{i % 3}") for i in range(10)]
    for r in reqs[:6]:
        scheduler.add_request(r)
    for _ in range(8):
        step(scheduler, runner)
    for r in reqs[6:]:
        scheduler.add_request(r)
    twin, twin_runner = copy.deepcopy((scheduler, runner))  # never estimated
    before = _summary(scheduler)
    estimator = _trained()
    newcomer = make_request(50, max_tokens=10, client="c9")
    estimates = estimator.estimate_finishes(reqs + [newcomer], scheduler, output_len=lambda r: 12)
    assert all(0 < e < math.inf for e in estimates)
    assert _summary(scheduler) == before == _summary(twin)
    assert newcomer.request_id not in scheduler.requests and newcomer.num_computed_tokens == 0
    while scheduler.has_unfinished_requests():  # and it goes on exactly as its twin does
        assert step(scheduler, runner) == step(twin, twin_runner)
        assert _summary(scheduler) == _summary(twin)


def test_a_small_pool_estimate_includes_preemption():
    def estimate(num_blocks: int) -> tuple[float, int]:
        scheduler, runner = make_scheduler(num_blocks=num_blocks, budget=512), FakeRunner()
        reqs = [make_request(40, max_tokens=60) for _ in range(4)]
        for r in reqs:
            scheduler.add_request(r)
        step(scheduler, runner)  # all four run: 12 blocks, and each must grow to 7
        estimator = _trained()
        forked = SimEngine.fork(scheduler, estimator.model)
        while forked.has_work():
            forked.step()
        return estimator.estimate_finish(reqs[-1], scheduler), forked.scheduler.num_preemptions

    small, preemptions = estimate(12)
    large, none = estimate(1000)
    assert preemptions > 0 and none == 0
    assert small > large


def test_estimate_work_is_bounded():
    scheduler = make_scheduler(budget=64, max_seqs=2)
    reqs = [make_request(200, max_tokens=2000) for _ in range(50)]
    for r in reqs:
        scheduler.add_request(r)
    started = time.perf_counter()
    eta = CompletionEstimator(max_steps=100).estimate_finish(reqs[-1], scheduler)
    assert time.perf_counter() - started < 1.0
    full = CompletionEstimator(max_steps=1_000_000, max_wall_s=math.inf).estimate_finish(reqs[-1], scheduler)
    assert 0 < eta < full < math.inf  # cut short and extrapolated, not simulated to the end
    assert CompletionEstimator(max_steps=0).estimate_finish(reqs[-1], scheduler) > 0
    # The wall-clock budget bounds it too (the engine waits for estimates between its steps).
    started = time.perf_counter()
    cut = CompletionEstimator(max_wall_s=0.0).estimate_finish(reqs[-1], scheduler)
    assert time.perf_counter() - started < 0.5 and 0 < cut < math.inf


def test_a_rate_limited_request_waits_in_simulated_time():
    now = [1000.0]
    policy = RPMPolicy(limit=1, clock=lambda: now[0])
    scheduler, runner = make_scheduler(budget=256, policy=policy), FakeRunner()
    first, second = make_request(32, max_tokens=20, client="a"), make_request(32, max_tokens=20, client="a")
    scheduler.add_request(first)
    step(scheduler, runner)
    scheduler.add_request(second)  # client "a" has used its one start this minute
    eta = _trained().estimate_finish(second, scheduler)
    assert 60.0 <= eta < 61.0  # admitted once the window passes in simulated time, then ~20 steps
    assert policy.clock() == 1000.0 and scheduler.policy.peek() is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_fork_shares_no_mutable_state(policy):
    scheduler, runner = make_scheduler(num_blocks=30, budget=64, max_seqs=3, policy=policy), FakeRunner()
    reqs = [make_request(30 + 7 * i, max_tokens=20, client=f"c{i % 2}", priority=i % 2) for i in range(7)]
    for r in reqs:
        scheduler.add_request(r)
    for _ in range(5):
        step(scheduler, runner)
    forked = fork_scheduler(scheduler)
    assert _summary(forked) | {"runner": {}} == _summary(scheduler) | {"runner": {}}
    assert forked._runner_blocks == {} and forked._finished_for_runner == []
    # Shared only what the scheduler never mutates: prompts, sampling params and specs.
    never_mutated = {id(x) for r in scheduler.requests.values() for x in _reachable(r.prompt_token_ids)}
    never_mutated |= {id(x) for r in scheduler.requests.values() for x in _reachable(r.sampling_params)}
    never_mutated |= {id(r.spec) for r in scheduler.requests.values()}  # frozen
    shared = {id(x) for x in _reachable(scheduler)} & {id(x) for x in _reachable(forked)}
    assert shared <= never_mutated


_ATOMIC = (int, float, str, bytes, bool, type(None), enum.Enum, frozenset, type)


def _reachable(root: object) -> list[object]:
    """Every mutable object reachable from root through attributes and containers."""
    seen: dict[int, object] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, _ATOMIC) or callable(obj) or id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, list | tuple | set | deque):
            todo.extend(obj)
        elif hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return [x for x in seen.values() if not isinstance(x, tuple)]


def test_a_prefill_instance_prices_its_requests_as_decoding_there():
    """Disaggregated serving: a request parks after its first token and finishes on a decode
    instance; the prefill instance estimates it as the colocated engine would, parked or not."""
    estimator = CompletionEstimator()
    for _ in range(20):
        estimator.observe(64, 4, _step_time(64, 4))
    prompts = [[(7 * k + i) % 900 + 20 for i in range(120)] for k in range(3)]

    def estimates(hand_off: bool, steps: int) -> list[float]:
        scheduler = make_scheduler(num_blocks=400, hand_off_after_prefill=hand_off)
        requests = [make_request(tokens=p, max_tokens=40, hand_off=hand_off) for p in prompts]
        for r in requests:
            scheduler.add_request(r)
        runner = FakeRunner()
        for _ in range(steps):
            step(scheduler, runner)
        return [estimator.estimate_finish(r, scheduler) for r in requests], len(scheduler.parked)

    colocated, _ = estimates(hand_off=False, steps=0)
    prefill, parked = estimates(hand_off=True, steps=0)
    assert prefill == pytest.approx(colocated) and all(math.isfinite(e) for e in prefill)
    later, parked = estimates(hand_off=True, steps=1)  # the whole prompts ran: all three parked
    assert parked == 3 and max(later) < max(colocated)
