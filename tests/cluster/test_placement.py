"""The startup-time placement of a model (ServerlessLLM): queue + bytes / tier bandwidth, smallest first;
a busy instance is freed by moving its requests when that beats waiting for them."""

from __future__ import annotations

import pytest

from sutra.cluster.placement import DEFAULT_BANDWIDTH, MOVE_S_PER_REQUEST, HostView, measured_bandwidth, place

GB = 10**9
MEASURED = {"cache": 8 * GB, "disk": 1 * GB}


def host(instance_id: str, **fields) -> HostView:
    defaults = dict(
        model="other",
        cached=frozenset(),
        bandwidth=MEASURED,
        busy_s=0.0,
        num_requests=0,
        move_s=None,
        last_used=0.0,
    )
    defaults.update(fields)
    return HostView(instance_id, **defaults)


def test_an_idle_instance_holding_the_weights_in_host_memory_wins():
    choice = place([host("a"), host("b", cached=frozenset({"m"}))], "m", 4 * GB)
    assert choice.instance_id == "b" and choice.tier == "cache"
    assert choice.load_s == pytest.approx(0.5) and choice.queue_s == 0 and not choice.move


def test_queue_plus_load_decides_between_a_busy_fast_tier_and_an_idle_disk():
    # b holds the weights in memory (0.5 s) but is busy for 2 s; a reads the disk: 4 s.
    hosts = [host("a"), host("b", cached=frozenset({"m"}), busy_s=2.0, num_requests=3)]
    choice = place(hosts, "m", 4 * GB)
    assert choice.instance_id == "b" and choice.total_s == pytest.approx(2.5)
    # Busy for 10 s: the disk on the idle one is quicker.
    hosts[1] = host("b", cached=frozenset({"m"}), busy_s=10.0, num_requests=3)
    assert place(hosts, "m", 4 * GB).instance_id == "a"


def test_a_busy_instance_is_freed_by_moving_its_requests_when_that_is_quicker():
    move_s = 2 * MOVE_S_PER_REQUEST
    busy = host("b", cached=frozenset({"m"}), busy_s=10.0, num_requests=2, move_s=move_s)
    choice = place([host("a"), busy], "m", 4 * GB)
    assert choice.instance_id == "b" and choice.move
    assert choice.queue_s == pytest.approx(move_s)
    # Its requests are nearly done: waiting beats moving them.
    nearly_done = host("b", cached=frozenset({"m"}), busy_s=0.1, num_requests=2, move_s=move_s)
    choice = place([host("a"), nearly_done], "m", 4 * GB)
    assert choice.instance_id == "b" and not choice.move and choice.queue_s == pytest.approx(0.1)
    # Nowhere to move them (its model's only instance): it waits, and the idle disk wins.
    stuck = host("b", cached=frozenset({"m"}), busy_s=10.0, num_requests=2, move_s=None)
    assert place([host("a"), stuck], "m", 4 * GB).instance_id == "a"


def test_an_instance_that_measured_nothing_uses_the_others_median_then_the_default():
    unmeasured = host("c", bandwidth={}, cached=frozenset({"m"}))
    assert measured_bandwidth([unmeasured]) == DEFAULT_BANDWIDTH
    fleet = [host("a", bandwidth={"cache": 2 * GB}), host("b", bandwidth={"cache": 6 * GB}), unmeasured]
    assert measured_bandwidth(fleet)["cache"] == 6 * GB  # the median (upper) of 2 and 6
    choice = place([unmeasured, host("d", bandwidth={"cache": 6 * GB}, model=None)], "m", 6 * GB)
    assert choice.instance_id == "c" and choice.load_s == pytest.approx(1.0)


def test_ties_go_to_the_least_recently_used_model_then_by_id():
    hosts = [host("a", last_used=5.0), host("b", last_used=1.0), host("c", last_used=1.0)]
    assert place(hosts, "m", GB).instance_id == "b"
    assert place([], "m", GB) is None
