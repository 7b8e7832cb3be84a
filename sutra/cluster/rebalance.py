"""Llumnix's migration trigger: which instances should hand a request to which, from load summaries.

Plain Python (no Ray), called by the global scheduler every few load polls. An instance is a
source when it is short of room (freeness below `out_threshold`: its running requests are about to
outgrow its free KV, or a queued request it cannot start counts against it), when it preempted
since the last round, or when it is draining (freeness -inf: everything leaves). It is a
destination when it has room and preempted nothing since the last round. The most loaded source
is paired with the freest destination, and so on; a pair is kept only if moving one request would
shrink the freeness gap between the two (Llumnix's `balanced` check), so requests do not bounce.
One request per pair per round; which request is the source's choice (the fewest blocks: cheapest
to move, as Llumnix's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sutra.core.stats import InstanceLoad

OUT_THRESHOLD = 3.0  # free KV blocks per running request (~48 decode steps at 16-token blocks)


@dataclass(frozen=True)
class MigrationPair:
    source: str
    destination: str


def freeness_after(load: InstanceLoad, moved_blocks: float, joins: bool) -> float:
    """The instance's freeness once one request of moved_blocks has left it (or joined it)."""
    sign = -1 if joins else 1
    used = load.virtual_used_blocks - sign * moved_blocks
    running = load.num_running + (1 if joins else -1)
    return (load.total_blocks - used) / max(1, running)


class Rebalancer:
    def __init__(self, out_threshold: float = OUT_THRESHOLD) -> None:
        self.out_threshold = out_threshold
        self._preemptions: dict[str, int] = {}  # per instance, at the last round

    def pairs(self, loads: dict[str, InstanceLoad]) -> list[MigrationPair]:
        preempted = {
            name
            for name, load in loads.items()
            if load.num_preemptions > self._preemptions.get(name, load.num_preemptions)
        }
        self._preemptions = {name: load.num_preemptions for name, load in loads.items()}
        sources = sorted(
            (
                name
                for name, load in loads.items()
                if load.num_running > 0
                and (load.draining or load.freeness < self.out_threshold or name in preempted)
            ),
            key=lambda name: loads[name].freeness,
        )
        destinations = sorted(
            (
                name
                for name, load in loads.items()
                if not load.draining and name not in preempted and load.freeness >= self.out_threshold
            ),
            key=lambda name: -loads[name].freeness,
        )
        pairs = []
        for source, destination in zip(sources, destinations, strict=False):
            if source != destination and self._balances(loads[source], loads[destination]):
                pairs.append(MigrationPair(source, destination))
        return pairs

    @staticmethod
    def _balances(source: InstanceLoad, destination: InstanceLoad) -> bool:
        if source.draining:
            return True
        moved = source.used_blocks / max(1, source.num_running)  # an average request's blocks
        if moved > destination.total_blocks - destination.used_blocks:
            return False
        gap = abs(source.freeness - destination.freeness)
        after = abs(
            freeness_after(source, moved, joins=False) - freeness_after(destination, moved, joins=True)
        )
        return math.isinf(gap) or after < gap
