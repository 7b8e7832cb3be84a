"""Where to start a model: ServerlessLLM's startup-time-optimized placement, as a pure function.

A model that no instance serves starts on the instance where it would be ready soonest:

    startup = queue + bytes / bandwidth(tier)

- tier: where the instance holds the model's weights: "cache" (its host cache of evicted models) or
  "disk" (only the source); bandwidth: what that instance measured on its latest load from the tier
  (another instance's measurement, then a default, until it has one).
- queue: how long until the instance is free for it. An instance whose model has no request on it is
  free now. A busy one is free once its requests are done (their completion estimates), or once they
  have moved to another instance of their model by live migration (Llumnix), a fraction of a second
  per request, after that model has started on a free instance if none serves it (ServerlessLLM's
  migration for locality): the cheaper of the two is taken, and the move is made.

Ties go to the instance whose current model was used least recently (LRU eviction), then by id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Tier = Literal["cache", "disk"]

# Until an instance has measured its own: bytes per second into a ready engine. Building an engine
# from host memory copies the weights once; from the disk it reads (and may convert) them.
DEFAULT_BANDWIDTH: dict[Tier, float] = {"cache": 4e9, "disk": 0.5e9}
# A live migration of one request between two instances of a model: its KV copy (stages overlap the
# decoding) and the pause, a few tens of milliseconds up to a few hundred for long contexts.
MOVE_S_PER_REQUEST = 0.2


@dataclass(frozen=True)
class HostView:
    """What the placement knows of one instance."""

    instance_id: str
    model: str | None  # the model it serves (None: none)
    cached: frozenset[str]  # models whose weights its host cache holds
    bandwidth: dict[str, float]  # tier -> bytes/s it measured
    busy_s: float  # until the requests it holds are done (0: it holds none)
    num_requests: int  # requests it holds
    move_s: float | None = None  # to move them to another instance of their model (None: cannot)
    last_used: float = 0.0  # when its model was last given a request (LRU)


@dataclass(frozen=True)
class Startup:
    """The estimated startup of a model on one instance, and how it is freed."""

    instance_id: str
    tier: Tier
    queue_s: float
    load_s: float
    move: bool  # free it by moving its requests away (else: wait for them)

    @property
    def total_s(self) -> float:
        return self.queue_s + self.load_s


def measured_bandwidth(hosts: list[HostView]) -> dict[Tier, float]:
    """Per tier, the median of what the instances measured (the default where none has)."""
    result = dict(DEFAULT_BANDWIDTH)
    for tier in DEFAULT_BANDWIDTH:
        values = sorted(h.bandwidth[tier] for h in hosts if h.bandwidth.get(tier, 0) > 0)
        if values:
            result[tier] = values[len(values) // 2]
    return result


def estimate_startup(host: HostView, model: str, nbytes: int, fallback: dict[Tier, float]) -> Startup:
    tier: Tier = "cache" if model in host.cached else "disk"
    bandwidth = host.bandwidth.get(tier) or fallback[tier]
    load_s = nbytes / bandwidth
    if host.num_requests == 0:
        return Startup(host.instance_id, tier, 0.0, load_s, move=False)
    if host.move_s is not None and host.move_s < host.busy_s:
        return Startup(host.instance_id, tier, host.move_s, load_s, move=True)
    return Startup(host.instance_id, tier, host.busy_s, load_s, move=False)


def load_seconds(host: HostView, model: str, nbytes: int, fallback: dict[Tier, float]) -> float:
    """How long `host` would take to load `model` once free."""
    return estimate_startup(dataclasses.replace(host, num_requests=0), model, nbytes, fallback).load_s


def place(hosts: list[HostView], model: str, nbytes: int) -> Startup | None:
    """The instance to start `model` on (of those given: the caller leaves out instances that serve
    it or are switching already), or None when none is given."""
    if not hosts:
        return None
    fallback = measured_bandwidth(hosts)
    by_id = {h.instance_id: h for h in hosts}
    estimates = [estimate_startup(h, model, nbytes, fallback) for h in hosts]
    return min(estimates, key=lambda e: (e.total_s, by_id[e.instance_id].last_used, e.instance_id))
