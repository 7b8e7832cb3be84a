"""Dispatch policies, without Ray: who gets a request, how a burst between two load reads spreads,
and that draining instances get nothing."""

from __future__ import annotations

import pytest

from sutra.cluster.dispatch import (
    DEFAULT_DISPATCH,
    DISPATCH_POLICIES,
    DispatchRequest,
    LeastLoadPolicy,
    LlumnixPolicy,
    NoInstanceError,
    RoundRobinPolicy,
    adjusted_freeness,
    make_dispatch_policy,
)
from sutra.core.stats import InstanceLoad

SMALL = DispatchRequest(num_requests=1, num_prompt_tokens=20, demand_blocks=2)


def load(used: int = 0, running: int = 0, waiting: int = 0, total: int = 100, **kw) -> InstanceLoad:
    return InstanceLoad(
        total_blocks=total,
        used_blocks=used,
        num_running=running,
        num_waiting=waiting,
        head_demand_blocks=kw.pop("head", 0),
        **kw,
    )


def test_registry_builds_each_policy_by_name():
    assert set(DISPATCH_POLICIES) == {"round-robin", "least-load", "llumnix"}
    assert DEFAULT_DISPATCH == "least-load"
    for name in DISPATCH_POLICIES:
        assert make_dispatch_policy(name).name == name
    with pytest.raises(ValueError, match="unknown dispatch policy 'fastest'.*least-load"):
        make_dispatch_policy("fastest")


def test_round_robin_takes_instances_in_turn_whatever_their_load():
    policy = RoundRobinPolicy()
    loads = {"i0": load(used=90, running=9), "i1": load(), "i2": load()}
    assert [policy.choose(loads, SMALL) for _ in range(5)] == ["i0", "i1", "i2", "i0", "i1"]


def test_round_robin_skips_draining_and_missing_instances_without_losing_its_turn():
    policy = RoundRobinPolicy()
    loads = {"i0": load(), "i1": load(), "i2": load()}
    assert policy.choose(loads, SMALL) == "i0"
    loads["i1"] = load(draining=True)
    assert policy.choose(loads, SMALL) == "i2"
    del loads["i2"]  # dead: the caller stops passing it
    assert [policy.choose(loads, SMALL) for _ in range(2)] == ["i0", "i0"]


def test_least_load_picks_the_highest_freeness():
    policy = LeastLoadPolicy()
    # i0: (100 - 40) / 2 = 30 free blocks per request; i1: (100 - 10 - 30 waiting head) / 1 = 60.
    loads = {"i0": load(used=40, running=2), "i1": load(used=10, running=1, waiting=1, head=30)}
    assert policy.choose(loads, SMALL) == "i1"
    # Freeness is per running request: more free blocks shared by more requests can be less free.
    loads = {"i0": load(used=20, running=4), "i1": load(used=50, running=1)}
    assert policy.choose(loads, SMALL) == "i1"


def test_least_load_spreads_a_burst_between_two_load_reads():
    """Without counting its own dispatches, every request of a burst would go to the instance that
    was freest at the last read (INFaaS++ adjusts for them)."""
    policy = LeastLoadPolicy()
    loads = {"i0": load(), "i1": load()}
    burst = [policy.choose(loads, SMALL) for _ in range(6)]
    assert burst.count("i0") == burst.count("i1") == 3
    # A somewhat busier instance still gets its share once the other's pending work catches up.
    policy = LeastLoadPolicy()
    loads = {"i0": load(used=30, running=1), "i1": load()}
    burst = [policy.choose(loads, DispatchRequest(1, 160, 10)) for _ in range(4)]
    assert burst[0] == "i1" and "i0" in burst


def test_pending_dispatches_clear_once_a_load_taken_after_them_arrives():
    policy = LeastLoadPolicy()
    loads = {"i0": load(), "i1": load()}
    mark = policy.mark()
    assert policy.choose(loads, SMALL) == "i0"
    # These loads were asked for before that dispatch: it stays pending.
    policy.loads_refreshed(["i0", "i1"], mark)
    assert policy.pending("i0") == [SMALL]
    assert policy.choose(loads, SMALL) == "i1"
    mark = policy.mark()
    policy.loads_refreshed(["i0"], mark)  # only i0's load came back
    assert policy.pending("i0") == [] and policy.pending("i1") == [SMALL]
    policy.forget("i1")
    assert policy.pending("i1") == []


def test_adjusted_freeness_counts_pending_requests_as_running():
    base = load(used=20, running=1)
    assert adjusted_freeness(base, []) == base.freeness == 80
    assert adjusted_freeness(base, [SMALL, SMALL]) == (100 - 20 - 4) / 3
    assert adjusted_freeness(load(draining=True), []) == float("-inf")


@pytest.mark.parametrize("policy_class", [RoundRobinPolicy, LeastLoadPolicy, LlumnixPolicy])
def test_draining_instances_get_nothing(policy_class):
    policy = policy_class()
    loads = {"i0": load(draining=True), "i1": load(used=99, running=50)}
    assert {policy.choose(loads, SMALL) for _ in range(4)} == {"i1"}
    loads["i1"] = load(draining=True)
    with pytest.raises(NoInstanceError, match="every engine instance is draining"):
        policy.choose(loads, SMALL)
    with pytest.raises(NoInstanceError, match="no engine instance"):
        policy.choose({}, SMALL)


def test_llumnix_dispatches_as_least_load():
    loads = {"i0": load(used=30, running=2), "i1": load(used=60, running=1), "i2": load(used=5, running=3)}
    requests = [DispatchRequest(1, 50 * k, 3 * k + 1) for k in range(1, 7)]
    least, llumnix = LeastLoadPolicy(), LlumnixPolicy()
    assert [llumnix.choose(loads, r) for r in requests] == [least.choose(loads, r) for r in requests]


def test_least_load_prefers_the_instance_with_the_prefix_while_it_has_room():
    from sutra.cluster.dispatch import DispatchRequest, LeastLoadPolicy, LlumnixPolicy, RoundRobinPolicy
    from sutra.core.stats import InstanceLoad

    loads = {"i0": InstanceLoad(100, 60, 4, 0, 0), "i1": InstanceLoad(100, 0, 0, 0, 0)}
    sticky = DispatchRequest(num_requests=1, num_prompt_tokens=64, demand_blocks=5, preferred="i0")
    for policy in (LeastLoadPolicy(), LlumnixPolicy()):
        assert policy.choose(loads, sticky) == "i0"  # busier, but it has the prefix and room
    full = {"i0": InstanceLoad(100, 98, 4, 0, 0), "i1": InstanceLoad(100, 0, 0, 0, 0)}
    assert LeastLoadPolicy().choose(full, sticky) == "i1"  # no room there: the load decides
    gone = DispatchRequest(num_requests=1, num_prompt_tokens=64, demand_blocks=5, preferred="i7")
    assert LeastLoadPolicy().choose(loads, gone) == "i1"
    rr = RoundRobinPolicy()
    assert [rr.choose(loads, sticky) for _ in range(2)] == ["i0", "i1"]  # blind to affinity


def test_prefix_affinity_finds_the_longest_known_prefix_per_salt():
    from sutra.cluster.affinity import PrefixAffinity, prefix_hashes

    affinity = PrefixAffinity(max_entries=8)
    shared = list(range(32))
    affinity.record(prefix_hashes(shared + [1, 2, 3], 16, None), "i0")
    affinity.record(prefix_hashes(shared[:16], 16, None), "i1")
    assert affinity.lookup(prefix_hashes(shared + list(range(50, 70)), 16, None)) == "i0"
    assert affinity.lookup(prefix_hashes(shared + list(range(50, 70)), 16, "tenant")) is None
    assert affinity.lookup(prefix_hashes(list(range(100, 140)), 16, None)) is None
    affinity.forget("i0")
    assert affinity.lookup(prefix_hashes(shared, 16, None)) == "i1"
    for k in range(20):
        affinity.record(prefix_hashes(list(range(k * 16, k * 16 + 16)), 16, None), "i1")
    assert len(affinity) == 8  # bounded
