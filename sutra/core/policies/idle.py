"""A bounded memory of idle keys (clients, priority classes): when each went idle, oldest first.

Policies remember per-client state (VTC counters, length predictions, rate windows) after a client's
last request ends, so that state must be forgotten eventually or a stream of distinct client names
grows the server's memory for ever. IdleSet says which idle key is due: the oldest one when more than
`max_idle` are kept (it must go), or one idle for `ttl_s` (it may go, if the policy can forget it
without changing a decision; else the policy postpones it). Every operation is O(1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# SchedulerConfig's defaults (client_idle_ttl_s, max_idle_clients), for policies built directly.
DEFAULT_IDLE_TTL_S = 600.0
DEFAULT_MAX_IDLE_CLIENTS = 4096


@dataclass(frozen=True)
class Due(Generic[K]):
    key: K
    forced: bool  # over the cap: it must be forgotten, whatever it costs


class IdleSet(Generic[K]):
    def __init__(self, ttl_s: float, max_idle: int) -> None:
        if not (ttl_s >= 0 and not math.isnan(ttl_s)):
            raise ValueError(f"idle time limit must be >= 0 seconds, got {ttl_s!r}")
        if max_idle < 0:
            raise ValueError(f"idle cap must be >= 0, got {max_idle!r}")
        self.ttl_s = ttl_s
        self.max_idle = max_idle
        self._since: OrderedDict[K, float] = OrderedDict()  # key -> idle since; oldest first

    def went_idle(self, key: K, now: float) -> None:
        self._since[key] = now
        self._since.move_to_end(key)

    def returned(self, key: K) -> None:
        """The key is active again: it is no candidate for forgetting."""
        self._since.pop(key, None)

    def postpone(self, key: K, now: float) -> None:
        """Look at it again one ttl_s from now (it could not be forgotten yet)."""
        self.went_idle(key, now)

    def forget(self, key: K) -> None:
        self._since.pop(key, None)

    def oldest(self) -> K:
        return next(iter(self._since))

    def due(self, now: float) -> Due[K] | None:
        if not self._since:
            return None
        key, since = next(iter(self._since.items()))
        if len(self._since) > self.max_idle:
            return Due(key, forced=True)
        if now - since >= self.ttl_s:
            return Due(key, forced=False)
        return None

    def __len__(self) -> int:
        return len(self._since)

    def __contains__(self, key: object) -> bool:
        return key in self._since
