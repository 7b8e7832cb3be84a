"""Dispatch: which engine instance takes a new request. Plain Python (no Ray), so it is tested alone
and a simulator can drive the same policies.

Registered policies (`sutra serve --dispatch`):
- round-robin: instances in turn, whatever their load (the baseline).
- least-load: the instance holding the prompt's longest known prefix while it has room (prefix
  affinity, cluster/affinity.py), else the one with the highest freeness (Llumnix's virtual-usage
  measure, see `InstanceLoad`), counting the requests dispatched to it since its load was last read,
  so a burst arriving between two reads spreads out instead of piling onto one instance (Llumnix's
  INFaaS++ baseline, plus prefix affinity).
- llumnix: the same choice, and the cluster rebalances the instances by live migration
  (cluster/rebalance.py, cluster/migrator.py).

Draining instances (`InstanceLoad.draining`) get nothing under any policy.

The caller owns the loads: it reads every instance's `InstanceLoad` now and then, passing them to
`choose`. To count dispatches the loads do not show yet, it takes `mark()` just before it asks for
the loads, and calls `loads_refreshed(instance_ids, mark)` once they arrive: the dispatches made
after the mark stay counted, since the loads may have been taken before those requests landed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from sutra.core.stats import InstanceLoad
from sutra.errors import SutraError


class NoInstanceError(SutraError):
    """No instance can take a request now: every one is draining (or there is none)."""


@dataclass(frozen=True)
class DispatchRequest:
    """What a policy knows of a request it places. All the prompts of one HTTP request go to one
    instance together, so this describes them all."""

    num_requests: int  # engine requests (prompts times n)
    num_prompt_tokens: int
    demand_blocks: int  # KV blocks their prompts need to start
    # The instance that served the longest known prefix of the prompt (cluster/affinity.py): a
    # load-aware policy takes it while it has room, to reuse its prefix cache.
    preferred: str | None = None


class DispatchPolicy(ABC):
    """Chooses an instance for each request, from the latest loads of the instances alive."""

    name: str = ""
    migrates: bool = False  # the cluster runs the migration trigger (cluster/rebalance.py) for it

    def __init__(self) -> None:
        self._seq = 0  # dispatches so far
        # Per instance: (dispatch number, request) of dispatches its last-read load may not show yet.
        self._pending: dict[str, list[tuple[int, DispatchRequest]]] = {}

    def choose(self, loads: Mapping[str, InstanceLoad], request: DispatchRequest) -> str:
        """The id of the instance to take `request`, among those in `loads`; the choice is counted
        as pending on that instance until a load read after it arrives."""
        eligible = {i: load for i, load in loads.items() if not load.draining}
        if not eligible:
            what = "every engine instance is draining" if loads else "no engine instance is available"
            raise NoInstanceError(f"{what}; retry later")
        choice = self._pick(eligible, request)
        self._seq += 1
        self._pending.setdefault(choice, []).append((self._seq, request))
        return choice

    @abstractmethod
    def _pick(self, loads: Mapping[str, InstanceLoad], request: DispatchRequest) -> str:
        """One of `loads` (none of them draining, at least one)."""

    # ---- what the loads do not show yet ----------------------------------------------------------
    def mark(self) -> int:
        """Take this just before asking the instances for their loads."""
        return self._seq

    def loads_refreshed(self, instance_ids: Iterable[str], mark: int) -> None:
        """Loads of these instances, asked for at `mark`, have arrived: dispatches up to the mark
        are in them; later ones stay pending."""
        for instance_id in instance_ids:
            pending = self._pending.get(instance_id)
            if pending:
                self._pending[instance_id] = [(seq, r) for seq, r in pending if seq > mark]

    def forget(self, instance_id: str) -> None:
        """The instance is gone (dead or removed)."""
        self._pending.pop(instance_id, None)

    def pending(self, instance_id: str) -> list[DispatchRequest]:
        """Requests dispatched to the instance that its last-read load may not show."""
        return [r for _, r in self._pending.get(instance_id, [])]


class RoundRobinPolicy(DispatchPolicy):
    """Instances in turn (in id order), skipping those not eligible; blind to load."""

    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def _pick(self, loads: Mapping[str, InstanceLoad], request: DispatchRequest) -> str:
        ids = sorted(loads)
        # The next id after the last one chosen, so an instance leaving does not reset the turn.
        later = [i for i in ids if self._last is not None and i > self._last]
        self._last = later[0] if later else ids[0]
        return self._last


def adjusted_freeness(load: InstanceLoad, pending: list[DispatchRequest]) -> float:
    """Llumnix freeness, as if the pending requests were already running there: their prompt blocks
    count as used and each one shares the free blocks."""
    if load.draining:
        return float("-inf")
    used = load.virtual_used_blocks + sum(r.demand_blocks for r in pending)
    running = load.num_running + sum(r.num_requests for r in pending)
    return (load.total_blocks - used) / max(1, running)


class LeastLoadPolicy(DispatchPolicy):
    """The freest instance (highest adjusted freeness); ties go to the one with the fewest requests
    running, waiting or pending, then to the lowest id, so equal instances take a burst in turn."""

    name = "least-load"

    def _pick(self, loads: Mapping[str, InstanceLoad], request: DispatchRequest) -> str:
        preferred = request.preferred
        if (
            preferred in loads
            and adjusted_freeness(loads[preferred], self.pending(preferred) + [request]) > 0
        ):
            return preferred

        def key(instance_id: str) -> tuple[float, int, str]:
            load, pending = loads[instance_id], self.pending(instance_id)
            queued = load.num_running + load.num_waiting + sum(r.num_requests for r in pending)
            return (-adjusted_freeness(load, pending), queued, instance_id)

        return min(loads, key=key)


class LlumnixPolicy(LeastLoadPolicy):
    """Llumnix: dispatch by freeness (the choice least-load makes); what sets it apart is that the
    cluster runs the migration trigger for it (`migrates`: cluster/rebalance.py pairs instances
    short of room with free ones, and cluster/migrator.py moves a request per pair)."""

    name = "llumnix"
    migrates = True


DISPATCH_POLICIES: dict[str, Callable[[], DispatchPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadPolicy.name: LeastLoadPolicy,
    LlumnixPolicy.name: LlumnixPolicy,
}
# Load-aware without migration's machinery: round-robin ignores that requests differ in length, so
# long ones pile up on one instance and preempt there while another idles.
DEFAULT_DISPATCH = LeastLoadPolicy.name


def make_dispatch_policy(name: str) -> DispatchPolicy:
    """The dispatch policy `name` names (see DISPATCH_POLICIES)."""
    try:
        factory = DISPATCH_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown dispatch policy {name!r}; choose one of {sorted(DISPATCH_POLICIES)}"
        ) from None
    return factory()


__all__ = [
    "DEFAULT_DISPATCH",
    "DISPATCH_POLICIES",
    "DispatchPolicy",
    "DispatchRequest",
    "LeastLoadPolicy",
    "LlumnixPolicy",
    "NoInstanceError",
    "RoundRobinPolicy",
    "adjusted_freeness",
    "make_dispatch_policy",
]
