"""The soak benchmark's mix: every kind of request with its weight, and the order they are sent in."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from soak_bad_inputs import BAD_INPUTS
from soak_requests import ABORT, ABORT_KINDS, BAD_INPUT, WELL_FORMED, WELL_FORMED_KINDS, Client, Result


@dataclass
class Kind:
    name: str
    category: str  # WELL_FORMED, ABORT or BAD_INPUT
    weight: float
    send: Callable[[Client], Awaitable[Result]]
    expected_status: int | None = None  # bad inputs only


def build_mix(abort_fraction: float, bad_fraction: float) -> list[Kind]:
    """Kinds with weights summing to 1: aborts and bad inputs as given (shared evenly within each
    group), well-formed requests the rest."""
    ok_fraction = 1.0 - abort_fraction - bad_fraction
    if ok_fraction < 0 or abort_fraction < 0 or bad_fraction < 0:
        raise ValueError("the abort and bad-input fractions must be >= 0 and sum to at most 1")
    groups = [
        [
            Kind(name, WELL_FORMED, ok_fraction / len(WELL_FORMED_KINDS), send)
            for name, send in WELL_FORMED_KINDS.items()
        ],
        [Kind(name, ABORT, abort_fraction / len(ABORT_KINDS), send) for name, send in ABORT_KINDS.items()],
        [
            Kind(name, BAD_INPUT, bad_fraction / len(BAD_INPUTS), send, status)
            for name, (status, send) in BAD_INPUTS.items()
        ],
    ]
    return [k for group in groups for k in group if k.weight > 0]


def schedule(mix: list[Kind], num_requests: int, rng: random.Random) -> list[Kind]:
    """The kinds of the run's requests in order: each kind's count is its weight's share (largest
    remainders; every kind at least once when there is room), shuffled. Counts do not depend on
    which client happens to send what, so a short run still covers every kind."""
    exact = [k.weight * num_requests for k in mix]
    counts = [int(x) for x in exact]
    if num_requests >= len(mix):
        counts = [max(1, c) for c in counts]
    by_remainder = sorted(range(len(mix)), key=lambda i: counts[i] - exact[i])
    for i in itertools.islice(itertools.cycle(by_remainder), max(0, num_requests - sum(counts))):
        counts[i] += 1
    while sum(counts) > num_requests:  # the minimum of one each overshot: trim the largest
        counts[counts.index(max(counts))] -= 1
    kinds = [k for k, c in zip(mix, counts, strict=True) for _ in range(c)]
    rng.shuffle(kinds)
    return kinds
