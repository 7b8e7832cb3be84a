"""Llumnix's migration pairing from load summaries (plain Python, no Ray)."""

from __future__ import annotations

from sutra.cluster.rebalance import MigrationPair, Rebalancer
from sutra.core.stats import InstanceLoad


def load(used: int, running: int, total: int = 100, head: int = 0, **kw) -> InstanceLoad:
    return InstanceLoad(
        total_blocks=total,
        used_blocks=used,
        num_running=running,
        num_waiting=int(head > 0),
        head_demand_blocks=head,
        **kw,
    )


def test_a_crowded_instance_hands_a_request_to_a_free_one():
    loads = {"a": load(95, 10), "b": load(10, 2)}
    assert Rebalancer().pairs(loads) == [MigrationPair("a", "b")]


def test_balanced_instances_are_left_alone():
    assert Rebalancer().pairs({"a": load(40, 5), "b": load(42, 5)}) == []


def test_a_queued_long_prompt_makes_room_by_migration():
    # Plenty free physically, but the head of the queue needs 60 blocks: de-fragmentation.
    loads = {"a": load(50, 5, head=60), "b": load(20, 5)}
    assert loads["a"].freeness < 0
    assert Rebalancer().pairs(loads) == [MigrationPair("a", "b")]


def test_a_draining_instance_sends_everything_out_and_takes_nothing():
    loads = {"a": load(5, 1, draining=True), "b": load(90, 9), "c": load(10, 1)}
    pairs = Rebalancer().pairs(loads)
    assert MigrationPair("a", "c") in pairs
    assert all(p.destination != "a" for p in pairs)


def test_preemptions_since_the_last_round_make_a_source_and_bar_a_destination():
    rebalancer = Rebalancer(out_threshold=1.0)
    calm = {"a": load(60, 6, num_preemptions=3), "b": load(20, 2, num_preemptions=0)}
    assert rebalancer.pairs(calm) == []  # freeness above the threshold on both, no new preemption
    pressed = {"a": load(60, 6, num_preemptions=5), "b": load(20, 2, num_preemptions=0)}
    assert rebalancer.pairs(pressed) == [MigrationPair("a", "b")]
    assert rebalancer.pairs({"a": load(60, 6, num_preemptions=5), "b": load(20, 2, num_preemptions=1)}) == []


def test_a_pair_that_would_not_shrink_the_gap_is_dropped():
    # Both short of room: moving an average request would only swap which one is crowded.
    loads = {"a": load(98, 2), "b": load(52, 1)}
    assert Rebalancer(out_threshold=30.0).pairs(loads) == []


def test_the_most_crowded_source_meets_the_freest_destination():
    loads = {"s1": load(99, 20), "s2": load(90, 10), "d1": load(10, 2), "d2": load(0, 0)}
    assert Rebalancer().pairs(loads) == [MigrationPair("s1", "d2"), MigrationPair("s2", "d1")]
