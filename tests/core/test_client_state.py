"""Per-client policy state stays bounded: idle clients are forgotten after a time limit or beyond a cap,
and forgetting a VTC counter at the time limit changes no scheduling decision."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from sutra.config import SchedulerConfig
from sutra.core.policies import POLICIES, Policy, PriorityPolicy, RPMPolicy, VTCPolicy, make_policy
from sutra.core.request import Request, RequestSpec
from sutra.sampling_params import SamplingParams
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, run_to_completion, step
from tests.core.workload import admit_next


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def _tracked(policy: Policy) -> int:
    """Per-client entries of every kind the policy keeps."""
    if isinstance(policy, VTCPolicy):
        return len(policy.counters.keys() | policy._mean_output_len.keys())
    if isinstance(policy, RPMPolicy):
        return len(policy._starts)
    if isinstance(policy, PriorityPolicy):
        return len(policy._classes) + sum(_tracked(inner) for inner in policy._classes.values())
    return 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ten_thousand_one_shot_clients_leave_bounded_state(name):
    cap = 64
    cfg = SchedulerConfig(policy=name, max_idle_clients=cap, client_idle_ttl_s=3600.0)
    policy = make_policy(cfg, clock=FakeClock())  # the clock never passes the time limit: the cap acts
    scheduler, runner = make_scheduler(policy=policy, max_seqs=64), FakeRunner()
    batch = 100
    for start in range(0, 10_000, batch):
        for i in range(start, start + batch):
            # Every request its own client, and under the priority policies its own class too.
            scheduler.add_request(make_request(8, max_tokens=2, client=f"client-{i}", priority=i))
        step(scheduler, runner)
        assert _tracked(policy) <= 2 * (cap + batch)  # the idle ones, and those in flight
        run_to_completion(scheduler, runner)
        assert _tracked(policy) <= 2 * cap
    assert scheduler.num_waiting == 0 and not scheduler.running


def test_vtc_forgets_at_the_time_limit_only_clients_not_ahead():
    clock = FakeClock()
    policy = VTCPolicy(clock=clock, idle_ttl_s=10.0)
    policy.add(make_request(8, client="a"))
    policy.add(make_request(8, client="b"))
    a1 = admit_next(policy, 8, outputs=50)  # a: 108, b still waits at 0
    policy.on_finished(a1)
    assert "a" in policy.counters  # idle, remembered
    clock.now = 20.0
    policy.add(make_request(8, client="b"))  # due, but ahead of b (the lowest active): kept
    assert policy.counters["a"] == 108
    b1 = admit_next(policy, 8, outputs=60)  # b: 128
    policy.on_finished(b1)  # b2 still waits
    clock.now = 40.0
    policy.add(make_request(8, client="c"))  # c lifted to 128; now b and c are both past a
    assert policy.counters["c"] == 128 and "a" not in policy.counters
    policy.add(make_request(8, client="a"))
    assert policy.counters["a"] == 128  # as remembered: max(108, 128)


def test_vtc_cap_forgets_the_longest_idle_first():
    policy = VTCPolicy(clock=FakeClock(), max_idle_clients=2)
    for name in "abc":
        policy.add(make_request(8, client=name))
        policy.on_finished(admit_next(policy, 8, outputs=1))
    assert set(policy.counters) == {"b", "c"}


def test_rpm_forgets_start_times_that_left_the_window():
    clock = FakeClock()
    policy = RPMPolicy(limit=1, clock=clock)
    scheduler, runner = make_scheduler(policy=policy), FakeRunner()
    for i in range(8):
        scheduler.add_request(make_request(8, max_tokens=2, client=f"c{i}"))
    run_to_completion(scheduler, runner)
    assert len(policy._starts) == 8
    late = make_request(8, max_tokens=2, client="c0")
    scheduler.add_request(late)
    clock.now = 59.0  # c0's start is still in the window: it waits, and nobody is forgotten
    step(scheduler, runner)
    assert late.num_computed_tokens == 0 and len(policy._starts) == 8
    clock.now = 60.0
    run_to_completion(scheduler, runner)
    assert late.num_output_tokens == 2
    assert len(policy._starts) <= 8 - 3  # a few per admission, oldest first


def test_priority_keeps_only_classes_in_use():
    policy = PriorityPolicy(clock=FakeClock())
    scheduler, runner = make_scheduler(policy=policy), FakeRunner()
    for level in range(1000):
        scheduler.add_request(make_request(8, max_tokens=2, priority=level))
    assert len(policy._levels) == 1000
    run_to_completion(scheduler, runner)
    assert policy._classes == {} and policy._levels == []


def _workload(seed: int, iterations: int, clients: int) -> list[list[tuple[str, int, int, int]]]:
    """Per iteration, the requests sent: (client, prompt length, max_tokens, priority). Clients go
    quiet and come back, so they are forgotten and return."""
    rng = random.Random(seed)
    period = {f"u{i}": rng.randint(20, 120) for i in range(clients)}
    sends: list[list[tuple[str, int, int, int]]] = []
    for it in range(iterations):
        now = []
        for client, p in period.items():
            on = (it // p) % 2 == 0
            if on and rng.random() < 0.03:
                now.append((client, rng.randint(4, 80), rng.randint(1, 30), rng.randint(0, 2)))
        sends.append(now)
    return sends


def _decisions(name: str, ttl_s: float, sends: list) -> tuple[list[list[tuple[str, int]]], list[int]]:
    """Each iteration's scheduled (request, tokens) in order, and the state kept after each."""
    clock = FakeClock()
    cfg = SchedulerConfig(policy=name, length_prediction=False, client_idle_ttl_s=ttl_s)
    policy = make_policy(cfg, clock=clock)
    scheduler, runner = make_scheduler(policy=policy, num_blocks=64, budget=96, max_seqs=16), FakeRunner()
    params = {}
    decisions: list[list[tuple[str, int]]] = []
    kept: list[int] = []
    serial = 0
    for it, batch in enumerate(sends):
        clock.now = float(it)
        for client, prompt_len, max_tokens, priority in batch:
            serial += 1
            sp = params.setdefault(max_tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            tokens = [(serial * 131 + j) % 5000 + 10 for j in range(prompt_len)]
            scheduler.add_request(
                Request(
                    f"w{serial}", tokens, sp, arrival_time=float(serial), spec=RequestSpec(client, priority)
                )
            )
        out = step(scheduler, runner)
        decisions.append(list(out.num_scheduled_tokens.items()))
        kept.append(_tracked(policy))
    return decisions, kept


@pytest.mark.parametrize("name", ["vtc", "priority-vtc"])
def test_forgetting_at_the_time_limit_changes_no_decision(name):
    sends = _workload(seed=3, iterations=1500, clients=24)
    remembered, kept_all = _decisions(name, ttl_s=1e9, sends=sends)
    forgetful, kept_less = _decisions(name, ttl_s=0.0, sends=sends)  # forget as soon as it is safe
    assert sum(kept_less) < 0.8 * sum(kept_all)  # state was forgotten along the way
    assert sum(len(d) for d in remembered) > 1000
    assert forgetful == remembered
